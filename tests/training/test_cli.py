"""caveat-train: bad input gives one clear line and exit status 2; a small slice trains a loadable bundle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adapters import load_bundle
from adapters.manifest import SCHEMA_VERSION
from training.calibration import CANDIDATES
from training.cli import main, parse_config


def _fails(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # model loading may print a progress bar before it
    assert last.startswith("caveat-train: error:") and message in last, err
    assert "Traceback" not in err


def test_unknown_dataset(capsys, tmp_path) -> None:
    _fails(capsys, ["--out", str(tmp_path / "b"), "--dataset", "imdb"], "imdb is no embedded name, local file")
    _fails(capsys, ["--out", str(tmp_path / "b"), "--dataset", "no such/data set"], "unknown dataset")


def test_missing_column_empty_file_and_single_label(capsys, tmp_path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(40)))
    _fails(capsys, ["--out", str(tmp_path / "b"), "--dataset", str(data)], "no column 'text'")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(capsys, ["--out", str(tmp_path / "b"), "--dataset", str(empty)], "holds no rows")
    single = tmp_path / "single.csv"
    single.write_text("text,label\n" + "".join(f"text {i},yes\n" for i in range(40)))
    _fails(capsys, ["--out", str(tmp_path / "b"), "--dataset", str(single)], "single label")
    _fails(capsys, ["--out", str(tmp_path / "b"), "--dataset", str(tmp_path / "nope.csv")], "does not exist")


def test_missing_model_path_and_bad_output(capsys, tmp_path) -> None:
    _fails(capsys, ["--out", str(tmp_path / "b"), "--base-model", str(tmp_path / "no-model")], "no such path")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    _fails(capsys, ["--out", str(occupied)], "holds other files")
    assert (occupied / "notes.txt").read_text() == "keep me"
    _fails(capsys, [], "--out is required")
    _fails(capsys, ["--out", str(tmp_path / "b"), "--posterior", "laplace-huge"], "unknown --posterior")
    _fails(capsys, ["--out", str(tmp_path / "b"), "--targets", "q_proj"], "'q_proj' matches nothing")


def test_bad_ood_method_and_a_training_set_too_small_for_the_score(capsys, tmp_path) -> None:
    _fails(capsys, ["--out", str(tmp_path / "b"), "--ood-method", "lof"], "unknown --ood-method 'lof'")
    _fails(capsys, ["--out", str(tmp_path / "b"), "--ood-fraction", "1.5"], "--ood-fraction must be in (0, 1)")
    _fails(capsys, ["--out", str(tmp_path / "b"), "--ood-length-buckets", "1"], "--ood-length-buckets must be 0")
    small = ["--out", str(tmp_path / "b"), "--train-limit", "40", "--validation-size", "40", "--eval-limit", "10",
             "--targets", "query", "--rank", "2", "--no-progress"]  # fmt: skip
    _fails(capsys, [*small, "--ood-train-size", "3"], "--ood-method mahalanobis cannot be fitted on 3 training inputs")
    _fails(capsys, [*small, "--ood-method", "knn", "--ood-k", "20", "--ood-train-size", "8"], "too few training")
    assert not (tmp_path / "b").exists()  # refused before any training or writing


def test_config_file_supplies_defaults_and_flags_override(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("rank: 4\ntargets: query,key\nposterior: laplace-diag\nout: somewhere\n")
    parsed = parse_config(["--config", str(config), "--rank", "6"])
    assert parsed.adapter.rank == 6 and parsed.adapter.targets == ["query", "key"]
    assert parsed.posterior.method == "laplace-diag" and parsed.bundle.out == "somewhere"
    (tmp_path / "bad.json").write_text(json.dumps({"rnak": 3}))
    with pytest.raises(Exception, match="unknown keys"):
        parse_config(["--config", str(tmp_path / "bad.json")])


@pytest.mark.slow
def test_pipeline_on_a_small_slice_writes_a_loadable_bundle(tmp_path) -> None:
    """The embedded default (MiniLM, SST-2, drug reviews, BBC News) on a few hundred examples, one epoch."""
    out = tmp_path / "bundle"
    argv = [
        "--out", str(out), "--shift", "drugreviews", "--ood", "bbcnews",
        "--train-limit", "200", "--eval-limit", "60", "--validation-size", "200", "--shift-limit", "40",
        "--ood-limit", "40", "--epochs", "1", "--rank", "4", "--targets", "query,value",
        "--num-samples", "4", "--laplace-limit", "64", "--max-length", "64", "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", *argv], capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = load_bundle(out)
    manifest = bundle.manifest
    assert manifest.posterior.family == "kron" and manifest.posterior.default_num_samples == 4
    ev = manifest.eval
    for split in ("test", "shift"):
        for method in ("map", "posterior"):
            assert set(getattr(getattr(ev, split), method)) >= {
                "accuracy",
                "ece",
                "nll",
                "brier",
                "aurc",
                "risk_at_80_coverage",
            }
    # the default calibration's rule: its choice and every candidate's validation figures; the served default
    # and the evaluated predictive follow the choice (the MAP's has no mutual information)
    calibration = manifest.calibration
    assert calibration.choice in CANDIDATES and list(calibration.candidates) == list(CANDIDATES)
    posterior_chosen = calibration.choice.startswith("posterior")
    assert manifest.posterior.predictive == ("glm" if posterior_chosen else "map") == ev.predictive
    assert (calibration.temperature != 1.0) == calibration.choice.endswith("temperature")
    assert ("mutual_information" in ev.ood.posterior) == posterior_chosen
    report = (out / "report.md").read_text()
    assert f"Served predictive: **{calibration.choice}**" in report and f"| served ({calibration.choice}) |" in report
    assert ev.shift.dataset == "drugreviews" and ev.ood.dataset == "bbcnews"
    assert ev.training.posterior["curvature_examples"] == 64 and ev.training.posterior["n_data"] == 200
    assert [r.kind for r in manifest.calibration.abstention] == ["ood", "max_prob"]  # ood names the reason first
    assert (
        manifest.schema_version == SCHEMA_VERSION
        and manifest.ood.method == "mahalanobis"
        and manifest.ood.layers == [3, 6]
    )
    assert bundle.ood is not None and bundle.ood.nbytes <= manifest.ood.budget_bytes
    assert 0 <= ev.ood.posterior["ood_score"] <= 1 and 0 <= ev.shift.posterior["ood_score_auroc"] <= 1
    assert "## OOD score" in (out / "report.md").read_text()
    assert ev.training.posterior["prior_method"] == "marglik, checked against the MAP on validation NLL and ECE"
    assert (out / "report.md").read_text().startswith("# bundle ")
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    sizes = sum((out / f).stat().st_size for f in ("bundle.json", "adapter.safetensors", "posterior.safetensors"))
    assert sizes < 2 * 1024 * 1024
    # a second run refuses to overwrite the bundle unless asked
    again = subprocess.run([sys.executable, "-m", "training.cli", *argv], capture_output=True, text=True, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_compare_refuses_unknown_posteriors_and_formats_its_table(capsys) -> None:
    from training.compare import markdown_table

    _fails(capsys, ["compare", "--posteriors", "map,swag-xl"], "unknown methods ['swag-xl']")
    rows = [
        {"posterior": "map", "train_seconds": 60.0, "bundle_kb": 1.0, "test": {"accuracy": 0.9, "ece": 0.05}},
        {"posterior": "laplace-kron", "train_seconds": 63.2, "bundle_kb": 9.5, "test": {"accuracy": 0.91}},
    ]
    table = markdown_table(rows).splitlines()
    assert table[0] == "| method | test acc | ECE | train s | bundle kB |"
    assert table[2] == "| map | 0.9000 | 0.0500 | 60 | 1 |"
    assert table[3] == "| laplace-kron | 0.9100 | — | 63 | 10 |"


def test_compare_writes_its_rows_after_every_method(tmp_path, monkeypatch) -> None:
    """A compare stopped by a failing (or killed) later method keeps the rows it measured. Before, the JSON
    was written once at the end: an hour of finished rows was lost with the last method."""
    from types import SimpleNamespace

    from training import compare as module

    session = SimpleNamespace(
        config=parse_config(["--no-progress"]), log=lambda _: None, accelerator=SimpleNamespace(is_main_process=True),
        map_result=SimpleNamespace(seconds=1.0), forget_outputs=lambda: None, imported=None,
    )  # fmt: skip

    def row(_session, method, _seconds, _ood, _fits):
        if method == "swag":
            raise RuntimeError("stopped")
        return {"posterior": method, "train_seconds": 1.0, "bundle_kb": 1.0, "test": {"accuracy": 0.5}}

    monkeypatch.setattr(module, "prepare", lambda config: session)
    monkeypatch.setattr(module, "fit_ood", lambda session: None)
    monkeypatch.setattr(module, "fit_map", lambda session: None)
    monkeypatch.setattr(module, "_row", row)
    out = tmp_path / "rows.json"
    with pytest.raises(RuntimeError, match="stopped"):
        module.compare(session.config, ["map", "laplace-kron", "swag"], out)
    assert [r["posterior"] for r in json.loads(out.read_text())["rows"]] == ["map", "laplace-kron"]


@pytest.mark.slow
def test_validation_grid_prior_on_a_small_slice(tmp_path) -> None:
    out = tmp_path / "grid"
    argv = [
        "--out", str(out), "--train-limit", "120", "--eval-limit", "40", "--validation-size", "120",
        "--epochs", "1", "--rank", "2", "--targets", "query", "--num-samples", "3", "--laplace-limit", "48",
        "--posterior", "laplace-diag", "--prior", "grid", "--max-length", "64", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    laplace = load_bundle(out).manifest.eval.training.posterior
    grid = {delta: value["nll"] for delta, value in laplace["grid_validation"].items()}
    assert laplace["prior_method"] == "validation grid" and len(grid) == 7
    best = min(grid, key=grid.get)
    assert float(best) == pytest.approx(laplace["prior_precision"], rel=1e-5)
    # --overwrite replaces the bundle; no staging directories are left behind
    assert main([*argv, "--prior", "marglik", "--overwrite", "--version", "v2"]) == 0
    assert load_bundle(out).manifest.version == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid"]


def test_same_seed_same_model_and_another_seed_another(tmp_path) -> None:
    """Everything random in setup is seeded: the same seed gives the same head and cores, bit for bit."""
    import torch

    from tests.service.bundles import save_tiny_base
    from training.config import TrainConfig
    from training.session import prepare

    base = save_tiny_base(tmp_path / "base")

    def setup(seed: int, global_state: int):
        config = TrainConfig.from_flat(base_model=str(base), train_limit=40, eval_limit=20, validation_size=40, rank=2,
                             targets=["query"], seed=seed, progress=False)  # fmt: skip
        torch.manual_seed(global_state)  # whatever the global generator held before must not matter
        return prepare(config).model.posterior_parameters(include_head=True)

    first, again, other = setup(0, global_state=1), setup(0, global_state=2), setup(1, global_state=1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])
