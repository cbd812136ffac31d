"""``--ood-length-buckets``: the trainer calibrates length-aware OOD p-values on validation with the token counts
its encoder gives (the server's count), and the ``ood`` rule's threshold is the score's own at the fraction."""

from __future__ import annotations

from pathlib import Path

import torch

from adapters import load_bundle
from tests.training.test_defaults import TINY
from training.cli import main, parse_config
from training.inference import base_features
from training.pipeline import train


def test_the_bundle_carries_length_aware_p_values_calibrated_on_validation(tiny_base: Path, tmp_path: Path) -> None:
    flags = ["--base-model", str(tiny_base), "--out", str(tmp_path / "b"), "--posterior", "map",
             "--ood-length-buckets", "2", "--ood-fraction", "0.1", *TINY, "--max-length", "64",
             "--eval-limit", "96"]  # fmt: skip
    path, session, _ = train(parse_config(flags))
    bundle = load_bundle(path)
    score = bundle.ood
    assert score.length_aware and bundle.manifest.ood.params["length_buckets"] == len(score.length_references) == 2
    validation = session.validation
    lengths = torch.tensor(session.encoder.lengths(validation))
    features = base_features(session.model, validation, session.encoder, bundle.manifest.ood.layers, progress=False)
    scores = score.score(features)
    buckets = torch.bucketize(lengths.double(), score.length_edges)
    for bucket, reference in enumerate(score.length_references):  # each bucket holds its validation inputs' scores
        torch.testing.assert_close(reference, scores[buckets == bucket].sort().values)
    rule = next(r for r in bundle.manifest.calibration.abstention if r.kind == "ood")
    assert rule.threshold == score.threshold(0.1)
    assert int((score.pvalue(scores, lengths) < rule.threshold).sum()) == int(0.1 * len(validation))


def test_a_validation_set_that_cannot_fill_the_buckets_exits_2(tiny_base: Path, tmp_path: Path, capsys) -> None:
    flags = ["--base-model", str(tiny_base), "--out", str(tmp_path / "b"), "--posterior", "map",
             "--ood-length-buckets", "8", *TINY, "--validation-size", "30"]  # fmt: skip
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "--ood-length-buckets 8: 30 validation inputs cannot fill 8 token-length buckets" in err, err
    assert "Traceback" not in err and not (tmp_path / "b").exists()
