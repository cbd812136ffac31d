"""The published long-run protocol on a tiny random BERT: ``--select-by last`` trains every epoch and keeps the
last; ``--checkpoint-epochs`` writes one bundle per named epoch, each fitted on the MAP as it was then; bad
values exit 2 with one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from adapters import load_bundle
from training.calibration import CANDIDATES
from training.cli import main, parse_config
from training.methods import fit
from training.session import fit_map

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
SLICE = [
    "--train-limit", "64", "--eval-limit", "16", "--validation-size", "64", "--rank", "2", "--targets",
    "query,value", "--laplace-limit", "16", "--max-length", "32", "--ood-method", "none", "--no-progress",
]  # fmt: skip


def _map_record(bundle_dir: Path) -> dict:
    return load_bundle(bundle_dir).manifest.eval.training.map


def test_select_by_last_trains_every_epoch_and_keeps_the_last(tiny_base: Path, tmp_path: Path) -> None:
    """With patience 1 and a learning rate that makes validation NLL worse, early stopping would end after
    epoch 2 and keep epoch 1; ``last`` runs all four and keeps the fourth."""
    flags = ["--base-model", str(tiny_base), *SLICE, "--epochs", "4", "--patience", "1", "--lr", "3.0", "--seed", "1"]
    assert main([*flags, "--out", str(tmp_path / "early")]) == 0
    early = _map_record(tmp_path / "early")
    assert early["best_epoch"] < len(early["history"]) < 4  # the setting does stop early
    assert main([*flags, "--select-by", "last", "--out", str(tmp_path / "last")]) == 0
    last = _map_record(tmp_path / "last")
    assert last["best_epoch"] == len(last["history"]) == 4


def test_checkpoint_epochs_fit_a_bundle_at_each_named_epoch(tiny_base: Path, tmp_path: Path) -> None:
    """Epochs 1 and 3 of a 3-epoch run: two bundles; the epoch-3 one has exactly the cores of a plain
    ``--select-by last`` run of 3 epochs (same seed), the epoch-1 one others, and each records its epoch."""
    flags = ["--base-model", str(tiny_base), *SLICE, "--epochs", "3", "--seed", "2"]
    assert main([*flags, "--checkpoint-epochs", "3,1", "--out", str(tmp_path / "run")]) == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch-1", "epoch-3"]
    assert main([*flags, "--select-by", "last", "--out", str(tmp_path / "last")]) == 0
    first, third, last = (load_bundle(tmp_path / p) for p in ("run/epoch-1", "run/epoch-3", "last"))
    assert all(torch.equal(third.cores[n], last.cores[n]) for n in last.cores)
    assert not any(torch.equal(first.cores[n], third.cores[n]) for n in third.cores)
    for bundle, epoch in ((first, 1), (third, 3)):
        record = bundle.manifest.eval.training.map
        assert record["best_epoch"] == epoch and record["checkpoint_epochs"] == [1, 3]
        assert len(record["history"]) == 3
    assert first.manifest.posterior.prior_precision != third.manifest.posterior.prior_precision  # fitted apart


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--select-by", "best"], "--select-by"),
        (["--epochs", "3", "--checkpoint-epochs", "2,5"], "--checkpoint-epochs 5 is beyond --epochs 3"),
        (["--checkpoint-epochs", "1,1"], "--checkpoint-epochs must name distinct epochs"),
        (["--checkpoint-epochs", "0"], "--checkpoint-epochs must name distinct epochs from 1 on"),
        (["--checkpoint-epochs", "2,x"], "--checkpoint-epochs takes ints, got 'x'"),
        (["--mc-scoring", "word"], "--mc-scoring"),
    ],
)
def test_bad_long_run_flags_exit_2_with_a_message(capsys, tmp_path: Path, flags: list[str], message: str) -> None:
    assert main(["--out", str(tmp_path / "b"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "b").exists()


def test_compare_has_the_shipped_default_beside_the_map_and_temperature(
    tiny_base: Path, tmp_path: Path, monkeypatch
) -> None:
    """``default`` is ``--posterior`` under the validation rule: its row names the choice and every candidate,
    and its metrics are the chosen predictive's (the MAP row's or the temperature row's when the MAP is chosen);
    the posterior is fitted once for it and its own row (a Laplace fit with the checked prior takes half an hour
    on a 2-core CPU for SmolLM2)."""
    from training import compare as module

    fitted = []
    monkeypatch.setattr(module, "fit", lambda session, method: fitted.append(str(method)) or fit(session, method))
    out = tmp_path / "rows.json"
    methods = "map,temperature,default,laplace-kron"
    argv = ["compare", "--posteriors", methods, "--json", str(out), "--base-model", str(tiny_base)]
    assert main([*argv, *SLICE, "--epochs", "2", "--posterior", "laplace-kron"]) == 0
    assert fitted == ["map", "laplace-kron"]
    rows = {row["posterior"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["laplace-kron"]["fit"] == rows["default"]["fit"]
    default = rows["default"]
    assert default["calibration"] in CANDIDATES and list(default["candidates"]) == list(CANDIDATES)
    assert rows["map"]["calibration"] is None  # fixed rows record no choice
    same = {"map": "map", "map+temperature": "temperature"}.get(default["calibration"])
    if same is not None:
        assert default["test"] == rows[same]["test"] and default["predictive"] == "map"
    else:
        assert default["predictive"] == "glm"


@pytest.mark.parametrize(
    ("methods", "objectives"), [("mc-dropout", ["mc-dropout"]), ("map,mc-dropout", [None, "mc-dropout"])]
)
def test_compare_trains_the_shared_map_only_for_a_method_that_uses_it(
    tiny_base: Path, tmp_path: Path, monkeypatch, methods: str, objectives: list
) -> None:
    """MC dropout trains its own MAP: compared alone it trains that one only (the shared 30-epoch MAP it never
    reads took 12.5 of the 27 minutes of the long run's MC dropout row)."""
    from training import compare as module

    trained = []

    def counted(session, objective=None):
        trained.append(None if objective is None else "mc-dropout")
        return fit_map(session, objective=objective)

    monkeypatch.setattr(module, "fit_map", counted)
    argv = ["compare", "--posteriors", methods, "--base-model", str(tiny_base), *SLICE, "--epochs", "1"]
    assert main(argv) == 0
    assert trained == objectives


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_checked_in_setting_parses_and_validates(path: Path) -> None:
    """The published-protocol settings stay in step with the flags: every key known, every value valid."""
    config = parse_config(["--config", str(path)])
    config.validate(needs_out=False)
    longrun = path.stem.startswith("longrun-")
    assert (config.optimisation.select_by == "last") == longrun


@pytest.fixture
def table(tmp_path: Path, monkeypatch):
    """scripts/seeds_table.py, reading its JSONs from tmp_path."""
    spec = importlib.util.spec_from_file_location(
        "seeds_table", Path(__file__).parents[2] / "scripts" / "seeds_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


def test_the_seeds_table_renders_mean_std_changes_and_the_published_change(table, tmp_path: Path) -> None:
    """scripts/seeds_table.py over two seeds' compare JSONs (and a variant's): mean ± std, the change from the
    same seed's MAP, and the published Laplace change beside the Laplace rows."""

    def row(name: str, ece: float, nll: float, **extra) -> dict:
        metrics = {"accuracy": 0.9, "ece": ece, "nll": nll, "brier": 0.1}
        return {"posterior": name, "test": metrics, "shift": metrics, **extra}

    for seed, (map_ece, kron_ece) in enumerate(((0.10, 0.05), (0.20, 0.10))):
        rows = [row("map", map_ece, 0.4), row("laplace-kron", kron_ece, 0.3),
                row("default", kron_ece, 0.3, calibration="posterior")]  # fmt: skip
        (tmp_path / f"longrun-sst2-seed{seed}.json").write_text(json.dumps({"rows": rows}))
        (tmp_path / f"longrun-sst2-marglik-seed{seed}.json").write_text(
            json.dumps({"rows": [row("laplace-kron", 0.3, 0.5)]})
        )
        swag = json.dumps({"rows": [row("swag", 0.05, 0.2)]})
        (tmp_path / f"longrun-sst2-more-swag-seed{seed}.json").write_text(swag)
    lines = table.render("longrun-sst2").splitlines()
    kron = next(line for line in lines if line.startswith("| laplace-kron |"))
    assert "| 0.075 ± 0.035 |" in kron and "| -50% | -25% |" in kron and kron.endswith("| -42% / -4% |")
    assert any(line.startswith("| laplace-kron (marglik) |") for line in lines)
    swag = next(line for line in lines if line.startswith("| swag |"))  # a second part of the main variant
    assert "| -62% |" in swag
    assert any(line.startswith("| default → posterior |") for line in lines)


def test_the_seeds_table_compares_a_row_of_some_seeds_with_those_seeds_maps(table, tmp_path: Path) -> None:
    """A method measured on seed 2 only is compared with seed 2's MAP, not with the first MAP listed."""
    metrics = {"accuracy": 0.9, "brier": 0.1}
    for seed, map_ece in ((0, 0.10), (1, 0.20), (2, 0.40)):
        rows = [{"posterior": "map", "test": {**metrics, "ece": map_ece, "nll": 0.4}}]
        (tmp_path / f"longrun-sst2-seed{seed}.json").write_text(json.dumps({"rows": rows}))
    dropout = [{"posterior": "mc-dropout", "test": {**metrics, "ece": 0.30, "nll": 0.2}}]
    (tmp_path / "longrun-sst2-more-mc-dropout-seed2.json").write_text(json.dumps({"rows": dropout}))
    line = next(line for line in table.render("longrun-sst2").splitlines() if line.startswith("| mc-dropout |"))
    assert "| -25% | -50% |" in line  # against seed 2's MAP (0.40); seed 0's (0.10) would give +200%


def test_the_seeds_table_compares_a_variant_with_its_own_map(table, tmp_path: Path) -> None:
    """L-LoRA-S trains its own MAP (its projections move): its Laplace row is compared with that MAP, not with the
    main variant's; a variant without a MAP of its own (marglik) is compared with the main one's."""
    metrics = {"accuracy": 0.9, "brier": 0.1}

    def rows(*named: tuple[str, float]) -> str:
        return json.dumps({"rows": [{"posterior": n, "test": {**metrics, "ece": e, "nll": 0.4}} for n, e in named]})

    (tmp_path / "longrun-sst2-seed0.json").write_text(rows(("map", 0.10)))
    (tmp_path / "longrun-sst2-llora-s-seed0.json").write_text(rows(("map", 0.40), ("laplace-kron", 0.20)))
    (tmp_path / "longrun-sst2-marglik-seed0.json").write_text(rows(("laplace-kron", 0.05)))
    lines = table.render("longrun-sst2").splitlines()
    llora_s = next(line for line in lines if line.startswith("| laplace-kron (llora-s) |"))
    assert "| -50% |" in llora_s  # against its own MAP (0.40); the main MAP (0.10) would give +100%
    marglik = next(line for line in lines if line.startswith("| laplace-kron (marglik) |"))
    assert "| -50% |" in marglik
