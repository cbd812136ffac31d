"""The serve → labels → recalibrate → swap loop: the new version's temperature reproduces a temperature over the
served probabilities exactly, its thresholds and conformal sets are refitted on the labels, the server takes it by
hot swap; bad logs exit 2 and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters import load_bundle, save_bundle
from adapters.conformal import ConformalCalibration
from adapters.errors import InvalidValueError, ManifestError
from adapters.feedback import LabelledAnswer, read_feedback
from adapters.manifest import MANIFEST_FILE
from adapters.predictive import predictive
from adapters.vocab import ConformalScore
from benchmarks.harness import synthetic_texts
from tests.service.bundles import make_bundle, running_app
from training.calibration import fit_temperature
from training.cli import main

TEXTS = synthetic_texts(60, seed=5)


@pytest.fixture(scope="module")
def loop(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    """A MAP bundle served, its answers labelled through the server (labels that disagree with it often: an
    overconfident model), the log the server wrote, and the recalibrated version."""
    root = tmp_path_factory.mktemp("loop")
    make_bundle(tiny_base, root / "adapters" / "m", name="m", family="map", seed=1, conformal="lac", core_scale=3.0)
    client = running_app(tiny_base, root / "adapters", feedback_dir=root / "log")
    results = client.post("/v1/predict", json={"adapter": "m", "inputs": TEXTS}).json()["results"]
    generator = torch.Generator().manual_seed(0)
    labels = [
        int(torch.bernoulli(torch.tensor(0.35), generator=generator)) ^ (r["label"] == "positive") for r in results
    ]
    items = [{"id": r["id"], "label": ["negative", "positive"][y]} for r, y in zip(results, labels, strict=True)]
    assert client.post("/v1/feedback", json={"feedback": items}).status_code == 200
    out = root / "adapters" / "m-recalibrated"
    assert main(["recalibrate", str(root / "adapters" / "m"), "--labels", str(root / "log"), "--out", str(out),
                 "--version", "2"]) == 0  # fmt: skip
    yield client, root, results, out
    client.__exit__(None, None, None)


def test_the_new_temperature_is_the_one_fitted_over_the_served_probabilities(loop) -> None:
    _, root, _, out = loop
    records, _ = read_feedback(root / "log")
    new, old = load_bundle(out), load_bundle(root / "adapters" / "m")
    record = new.manifest.eval.recalibration
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0))
    fitted = [records[i] for i in order[: record["fitted_on"]]]
    log_p = torch.tensor([r.probs for r in fitted], dtype=torch.float64).log()
    tau = fit_temperature(log_p.unsqueeze(0), torch.tensor([r.label for r in fitted]))
    assert record["temperature_over_served"] == pytest.approx(tau, rel=1e-12)
    assert new.manifest.calibration.temperature == pytest.approx(old.manifest.calibration.temperature * tau)
    assert tau > 1  # the labels disagree with a confident model: it gets cooler
    assert new.manifest.version == "2" and record["from_version"] == old.version
    assert torch.equal(new.cores[next(iter(new.cores))], old.cores[next(iter(old.cores))])  # never the cores
    assert record["after"]["nll"] < record["before"]["nll"]
    assert "## Recalibration on production labels" in (out / "report.md").read_text()


def test_the_server_swaps_to_the_new_version_and_serves_the_recalibrated_probabilities(loop) -> None:
    client, _, results, out = loop
    tau = load_bundle(out).manifest.eval.recalibration["temperature_over_served"]
    swapped = client.put("/v1/adapters/m", json={"path": "m-recalibrated"})
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["adapter"]["version"] == "2"
    after = client.post("/v1/predict", json={"adapter": "m", "inputs": TEXTS}).json()["results"]
    old = torch.tensor([r["probs"] for r in results], dtype=torch.float64)
    expected = predictive(old.log(), tau).probs.double()
    served = torch.tensor([r["probs"] for r in after], dtype=torch.float64)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-4)
    new = load_bundle(out)
    sets = new.conformal.sets(served, new.manifest.conformal.alpha)
    served_sets = [r["prediction_set"] for r in after]
    assert served_sets == [[["negative", "positive"][i] for i in row.nonzero().flatten()] for row in sets]


def write_log(path: Path, records: list[LabelledAnswer]) -> Path:
    path.write_text("".join(r.model_dump_json() + "\n" for r in records))
    return path


def labelled(adapter: str = "m", version: str = "1", label: str = "negative", count: int = 40) -> list[LabelledAnswer]:
    return [
        LabelledAnswer(id=f"x-{i}", adapter=adapter, version=version, input="good film", label=0, label_name=label,
                       probs=[0.9, 0.1], predicted=0, served_at=0, labelled_at=1)
        for i in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "holds no labelled answers"),
        (labelled(adapter="other"), "no labels for m@1; the log holds other@1"),
        (labelled(version="7"), "no labels for m@1; the log holds m@7"),
        (labelled(label="maybe"), "has label 'maybe', unknown here"),
        (labelled(count=10), "at least 20"),
    ],
)
def test_bad_logs_exit_2_and_write_nothing(loop, records, message, tmp_path: Path, capsys) -> None:
    _, root, _, _ = loop
    log = write_log(tmp_path / "log.jsonl", records)
    out = tmp_path / "new"
    assert main(["recalibrate", str(root / "adapters" / "m"), "--labels", str(log), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".new*"))


def test_a_posterior_bundle_without_logged_draws_is_refused(tiny_base: Path, tmp_path: Path, capsys) -> None:
    make_bundle(tiny_base, tmp_path / "d", name="m", family="diag", seed=2)
    log = write_log(tmp_path / "log.jsonl", labelled())
    assert main(["recalibrate", str(tmp_path / "d"), "--labels", str(log), "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert "serves the sample posterior predictive" in err and "carry no per-draw probabilities" in err


def test_a_posterior_bundle_is_refitted_over_its_logged_draws_and_served_exactly(
    tiny_base: Path, tmp_path: Path
) -> None:
    """The served posterior predictive mixes S draws; the log keeps them, the temperature is fitted over them, and
    the new version serves, for the same request and seed, exactly the predictive of those draws at that
    temperature (before: a bundle serving a posterior could not be recalibrated)."""
    adapters = tmp_path / "adapters"
    make_bundle(tiny_base, adapters / "d", name="d", family="diag", seed=2, core_scale=3.0, variance=0.5)
    client = running_app(tiny_base, adapters, feedback_dir=tmp_path / "log")
    try:
        request = {"adapter": "d", "inputs": TEXTS, "method": "sample", "num_samples": 8, "seed": 3}
        results = client.post("/v1/predict", json=request).json()["results"]
        generator = torch.Generator().manual_seed(1)
        flips = torch.bernoulli(torch.full((len(results),), 0.35), generator=generator).bool().tolist()
        items = [{"id": r["id"], "label": ["negative", "positive"][(r["label"] == "positive") ^ f]}
                 for r, f in zip(results, flips, strict=True)]  # fmt: skip
        assert client.post("/v1/feedback", json={"feedback": items}).status_code == 200
        records, _ = read_feedback(tmp_path / "log")
        assert all(len(r.sample_probs) == 8 for r in records)
        out = adapters / "d-2"
        assert main(["recalibrate", str(adapters / "d"), "--labels", str(tmp_path / "log"), "--out", str(out),
                     "--version", "2"]) == 0  # fmt: skip
        tau = load_bundle(out).manifest.eval.recalibration["temperature_over_served"]
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0))
        fitted = [records[i] for i in order[: load_bundle(out).manifest.eval.recalibration["fitted_on"]]]
        draws = torch.tensor([r.sample_probs for r in fitted], dtype=torch.float64).transpose(0, 1).log()
        assert tau == pytest.approx(fit_temperature(draws, torch.tensor([r.label for r in fitted])), rel=1e-12)
        assert client.put("/v1/adapters/d", json={"path": "d-2"}).status_code == 200
        after = client.post("/v1/predict", json=request).json()["results"]
        logged = torch.tensor([r.sample_probs for r in records], dtype=torch.float64).transpose(0, 1).log()
        by_id = {r.id: i for i, r in enumerate(records)}
        expected = predictive(logged, tau).probs[[by_id[r["id"]] for r in results]].double()
        served = torch.tensor([r["probs"] for r in after], dtype=torch.float64)
        torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-4)
    finally:
        client.__exit__(None, None, None)


def test_a_log_line_that_is_not_a_record_is_named(loop, tmp_path: Path, capsys) -> None:
    _, root, _, _ = loop
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"id": "x"}) + "\n")
    assert main(["recalibrate", str(root / "adapters" / "m"), "--labels", str(log), "--out", str(tmp_path / "n")]) == 2
    assert "log.jsonl:1: not a feedback record" in capsys.readouterr().err


def _label_answers(client, results: list[dict], seed: int) -> None:
    """Feedback for served ``results``: their own label flipped w.p. 0.35 (an overconfident model's labels)."""
    flips = torch.bernoulli(torch.full((len(results),), 0.35), generator=torch.Generator().manual_seed(seed))
    items = [{"id": r["id"], "label": ["negative", "positive"][(r["label"] == "positive") ^ bool(f)]}
             for r, f in zip(results, flips.tolist(), strict=True)]  # fmt: skip
    assert client.post("/v1/feedback", json={"feedback": items}).status_code == 200


@pytest.fixture(scope="module")
def far_loop(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    """A MAP bundle with an OOD score and conformal sets served, its answers labelled, and ``recalibrate --by-ood``
    with half of the inputs counted far out; the server swapped to the new version."""
    root = tmp_path_factory.mktemp("far")
    adapters, texts = root / "adapters", synthetic_texts(64, seed=7)  # one request's most
    make_bundle(tiny_base, adapters / "f", name="f", family="map", seed=1, core_scale=3.0, ood_method="mahalanobis",
                conformal="lac")  # fmt: skip
    client = running_app(tiny_base, adapters, feedback_dir=root / "log")
    request = {"adapter": "f", "inputs": texts, "method": "map"}
    results = client.post("/v1/predict", json=request).json()["results"]
    pvalues = [r["uncertainty"]["ood_pvalue"] for r in results]
    below = sorted(pvalues)[len(pvalues) // 2]
    _label_answers(client, results, seed=2)
    flags = ["--by-ood", "--ood-pvalue-below", str(below), "--holdout", "0.2", "--version", "2"]
    assert main(["recalibrate", str(adapters / "f"), "--labels", str(root / "log"), "--out", str(adapters / "f-2"),
                 *flags]) == 0  # fmt: skip
    assert client.put("/v1/adapters/f", json={"path": "f-2"}).status_code == 200
    after = client.post("/v1/predict", json=request).json()["results"]
    yield client, root, request, results, after, below
    client.__exit__(None, None, None)


def test_by_ood_refits_a_temperature_for_far_inputs_only_and_the_server_serves_it_to_them(far_loop) -> None:
    """``--by-ood``: the temperature is fitted on the labels of inputs below the p-value level only and served to
    such inputs only, with conformal sets calibrated on those labels; the others keep the validation-calibrated
    predictive and sets exactly."""
    _, root, _, results, after, below = far_loop
    adapters = root / "adapters"
    pvalues = [r["uncertainty"]["ood_pvalue"] for r in results]
    old, new = load_bundle(adapters / "f"), load_bundle(adapters / "f-2")
    record = new.manifest.eval.recalibration
    tau, far = record["temperature_over_served"], new.manifest.calibration.far_temperature
    assert far.pvalue_below == below and record["far_pvalue_below"] == below
    assert far.temperature == pytest.approx(old.manifest.calibration.temperature * tau)
    assert new.manifest.calibration.temperature == old.manifest.calibration.temperature  # the others keep it
    records, _ = read_feedback(root / "log")
    records = [r for r in records if r.version == "1"]
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0))
    fitted = [records[i] for i in order[: len(records) - round(0.2 * len(records))] if records[i].ood_pvalue < below]
    log_p = torch.tensor([r.probs for r in fitted], dtype=torch.float64).log().unsqueeze(0)
    fitted_labels = torch.tensor([r.label for r in fitted])
    assert tau == pytest.approx(fit_temperature(log_p, fitted_labels), rel=1e-12)
    far_calibration = ConformalCalibration.fit(predictive(log_p, tau).probs, fitted_labels, ConformalScore.LAC)
    torch.testing.assert_close(new.far_conformal.scores, far_calibration.scores)
    assert new.manifest.conformal.far.size == len(fitted) and old.manifest.conformal.far is None
    before = torch.tensor([r["probs"] for r in results], dtype=torch.float64)
    scale = torch.tensor([tau if p < below else 1.0 for p in pvalues], dtype=torch.float64)
    expected = torch.softmax(before.log() / scale.unsqueeze(-1), dim=-1)
    served = torch.tensor([r["probs"] for r in after], dtype=torch.float64)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-4)
    near = [i for i, p in enumerate(pvalues) if p >= below]
    far_rows = [i for i, p in enumerate(pvalues) if p < below]
    assert torch.equal(served[near].float(), before[near].float())  # untouched, bit for bit
    alpha = new.manifest.conformal.alpha
    for rows, calibration in ((near, old.conformal), (far_rows, new.far_conformal)):
        sets = calibration.sets(served[rows], alpha)
        names = [[new.manifest.task.labels[c] for c in row.nonzero().flatten().tolist()] for row in sets]
        assert [after[i]["prediction_set"] for i in rows] == names
    assert new.manifest.conformal.far.thresholds != old.manifest.conformal.thresholds  # the far sets are others


def test_a_global_recalibration_after_by_ood_moves_the_far_temperature_too(far_loop, tmp_path: Path) -> None:
    """Far inputs were served at the far temperature, so the temperature fitted over every served answer applies
    to it as well (it was kept as it was), and the sets refitted on every label replace the far-out ones."""
    client, root, _, _, after, _ = far_loop
    _label_answers(client, after, seed=3)  # version 2's answers (the log keeps version 1's too)
    out = tmp_path / "f-3"
    argv = ["recalibrate", str(root / "adapters" / "f-2"), "--labels", str(root / "log"), "--out", str(out)]
    assert main([*argv, "--version", "3"]) == 0
    old, new = load_bundle(root / "adapters" / "f-2"), load_bundle(out)
    tau = new.manifest.eval.recalibration["temperature_over_served"]
    old_far, far = old.manifest.calibration.far_temperature, new.manifest.calibration.far_temperature
    assert far.pvalue_below == old_far.pvalue_below
    assert far.temperature == pytest.approx(old_far.temperature * tau)
    assert new.manifest.calibration.temperature == pytest.approx(old.manifest.calibration.temperature * tau)
    assert new.far_conformal is None and new.manifest.conformal.far is None
    argv = ["recalibrate", str(root / "adapters" / "f-2"), "--labels", str(root / "log"), "--out", str(tmp_path / "x")]
    assert main([*argv, "--by-ood", "--ood-pvalue-below", "0.999"]) == 2  # another level than the served one
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--by-ood"], "--by-ood needs a bundle with an OOD score"),
        (["--ood-pvalue-below", "0.1"], "--ood-pvalue-below is a level of --by-ood"),
    ],
)
def test_by_ood_options_that_cannot_apply_exit_2(loop, flags, message, tmp_path: Path, capsys) -> None:
    _, root, _, _ = loop
    out = tmp_path / "new"
    argv = ["recalibrate", str(root / "adapters" / "m"), "--labels", str(root / "log"), "--out", str(out), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_a_far_calibration_round_trips_and_a_damaged_one_is_refused(far_loop, tmp_path: Path) -> None:
    _, root, _, _, _, _ = far_loop
    bundle = load_bundle(root / "adapters" / "f-2")
    saved = load_bundle(save_bundle(bundle, tmp_path / "copy"))
    assert torch.equal(saved.far_conformal.scores, bundle.far_conformal.scores)
    assert torch.equal(saved.far_conformal.labels, bundle.far_conformal.labels)
    manifest_path = tmp_path / "copy" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["conformal"]["far"]["thresholds"][0] = 0.123
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(InvalidValueError, match="other far_thresholds"):
        load_bundle(tmp_path / "copy")
    manifest["calibration"]["far_temperature"] = None
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"conformal.far needs calibration.far_temperature"):
        load_bundle(tmp_path / "copy")
