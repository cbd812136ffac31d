"""Predictive modes as objects (``adapters.predictives``) and the one table of answer fields (``service.fields``):
the registry covers the vocabulary, one rule decides a request's mode, each mode's rows, cost and draws are what
it says, the GLM's served draws equal the plain formula, and the encoders built from the table match the
documented schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from adapters.posteriors import DiagPosterior, EnsemblePosterior, MapPosterior
from adapters.posteriors.base import make_generator
from adapters.predictive import Predictive, glm_logit_draws, predictive
from adapters.predictives import (
    GLM,
    MAP,
    PREDICTORS,
    SAMPLE,
    PredictorUnavailableError,
    forward_kinds,
    get_predictor,
    predictor_for,
)
from adapters.vocab import AbstentionKind, PredictiveMode
from service.fields import ANSWER_FIELDS, PREDICTIVE_FIELDS, V2_OUTPUTS, PredictResult, encode_results
from service.schemas import AbstainOverride
from tests.service.bundles import make_bundle, running_app

MEAN = {"layer": torch.zeros(2, 2), "head.weight": torch.ones(3, 4)}


def test_every_mode_of_the_vocabulary_is_registered_and_nothing_else() -> None:
    assert set(PREDICTORS) == set(PredictiveMode)
    assert all(PREDICTORS[mode].mode == mode for mode in PREDICTORS)
    assert forward_kinds() == ["rows", "jacobians"]  # sampled and MAP rows first: they carry the OOD base rows
    with pytest.raises(ValueError, match="method must be one of"):
        get_predictor("laplace")


def test_one_rule_decides_the_mode_of_a_request() -> None:
    diag = DiagPosterior(MEAN, {k: torch.ones_like(v) for k, v in MEAN.items()})
    assert predictor_for(None, diag, "glm") is GLM and predictor_for("sample", diag, "glm") is SAMPLE
    assert predictor_for("glm", MapPosterior(MEAN), "sample") is MAP  # a MAP bundle has nothing to sample
    with pytest.raises(ValueError, match="method must be one of"):  # ... but an unknown name is still refused
        predictor_for("bogus", MapPosterior(MEAN), "sample")
    ensemble = EnsemblePosterior({k: torch.stack([v, v + 1]) for k, v in MEAN.items()})
    with pytest.raises(PredictorUnavailableError, match="ensemble posterior has no GLM predictive"):
        predictor_for("glm", ensemble, "sample")


def test_rows_passes_and_draws_of_each_mode() -> None:
    assert [p.network_samples(16) for p in (SAMPLE, GLM, MAP)] == [16, 1, 16]
    assert MAP.fixed_draws == 1 and GLM.logit_space and not MAP.epistemic
    assert [p.passes(3) for p in (SAMPLE, GLM, MAP)] == [1, 4, 1]
    diag = DiagPosterior(MEAN, {k: torch.ones_like(v) for k, v in MEAN.items()})
    cores, points = {"layer": torch.eye(2)}, {}
    drawn = MAP.draw_many(diag, cores, [(1, 0), (1, 5)], points)
    assert drawn[0] is drawn[1] is MAP.draw_many(diag, cores, [(1, 9)], points)[0]  # one shared dict
    assert torch.equal(drawn[0]["layer"], torch.eye(2)[None])
    point = GLM.draw_many(diag, cores, [(64, 0)], points)[0]
    assert torch.equal(point["head.weight"], MEAN["head.weight"][None])  # the linearisation point: the mean
    first, second = SAMPLE.draw_many(diag, cores, [(3, 1), (2, 2)], points)
    assert first["layer"].shape == (3, 2, 2) and torch.equal(
        second["layer"], diag.sample(2, make_generator(2))["layer"]
    )


def test_glm_draws_of_requests_together_equal_the_formula_for_each_alone() -> None:
    """Oracle: ``f̂ + (J Σ Jᵀ)^{1/2} ε`` with each request's noise from its seed (``glm_logit_draws``)."""
    generator = torch.Generator().manual_seed(0)
    mean = {"core": torch.randn(2, 2, generator=generator)}
    posterior = DiagPosterior(mean, {"core": torch.rand(2, 2, generator=generator) + 0.1})
    logits = [torch.randn(1, n, 3, generator=generator) for n in (2, 3)]
    jacobians = [{"core": torch.randn(n, 3, 2, 2, generator=generator)} for n in (2, 3)]
    draws = [dataclasses.make_dataclass("D", ["num_samples", "seed"])(s, seed) for s, seed in ((8, 11), (8, 12))]
    together = GLM.logit_draws(logits, jacobians, posterior, draws)
    for k, (part, jac, d) in enumerate(zip(logits, jacobians, draws, strict=True)):
        covariance = posterior.jacobian_covariance(jac)
        alone = glm_logit_draws(part[0], covariance, d.num_samples, make_generator(d.seed))
        columns = slice(0, 2) if k == 0 else slice(2, 5)
        torch.testing.assert_close(together[:, columns], alone, rtol=1e-12, atol=1e-12)


def test_answer_fields_are_the_predictive_s_and_the_documented_schema() -> None:
    names = {f.name for f in dataclasses.fields(Predictive)}
    assert set(PREDICTIVE_FIELDS) <= names  # the engine reads them by name
    assert V2_OUTPUTS == (
        "probs", "entropy", "mutual_information", "abstain", "label", "ood_score", "prediction_set", "id"
    )  # fmt: skip
    assert set(AbstainOverride.model_fields) == set(AbstentionKind)
    pred = predictive(torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.5], [0.2, 0.1]]]))
    values = {name: getattr(pred, name).tolist() for name in PREDICTIVE_FIELDS}
    values |= {"abstain": [False, True], "abstain_reason": [None, "max_prob below 0.9"], "id": ["r-0", "r-1"]}
    for ood in (None, {"ood_score": [1.5, 9.0], "ood_pvalue": [0.5, 0.01]}):
        results = encode_results(values | (ood or {}), ["neg", "pos"])
        for result in results:
            PredictResult.model_validate(result, strict=True)  # the documented shape, field for field
            assert list(result) == ["id", "label", "probs", "confidence", "uncertainty", "prediction_set", "abstain",
                                    "abstain_reason", "samples"]  # fmt: skip
        assert results == _plain_results(values | (ood or {}), ["neg", "pos"])  # the compiled encoder: a loop's
        assert results[0]["label"] == "neg" and results[1]["abstain_reason"] == "max_prob below 0.9"
        assert results[1]["uncertainty"]["ood_pvalue"] == (None if ood is None else 0.01)
    assert {f.name for f in ANSWER_FIELDS if f.optional} == {"ood_score", "ood_pvalue", "prediction_set"}


def _plain_results(values: dict[str, list], labels: list[str]) -> list[dict]:
    """The oracle of ``encode_results``: a loop over the table, field by field."""
    results = []
    for i in range(len(values["label"])):
        result: dict = {}
        for field in ANSWER_FIELDS:
            value = values[field.name][i] if field.name in values else None
            value = labels[value] if field.name == "label" else value
            (result.setdefault("uncertainty", {}) if field.uncertainty else result)[field.name] = value
        results.append(result | {"samples": None})
    return results


def test_an_unknown_method_is_refused_for_a_map_bundle_too(tiny_base: Path, tmp_path: Path) -> None:
    make_bundle(tiny_base, tmp_path / "adapters" / "point", name="point", family="map")
    client = running_app(tiny_base, tmp_path / "adapters")
    try:
        text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}
        bogus = client.post("/v2/models/point/infer", json={"parameters": {"method": "bogus"}, "inputs": [text]})
        assert bogus.status_code == 400 and "method must be one of" in bogus.json()["error"]
        glm = client.post("/v1/predict", json={"adapter": "point", "inputs": ["fine"], "method": "glm"}).json()
        assert (glm["method"], glm["num_samples"]) == ("map", 1)
        metadata = client.get("/v2/models/point").json()
        # no OOD score, no conformal calibration: neither ood_score nor prediction_set
        expected = [name for name in V2_OUTPUTS if name not in ("ood_score", "prediction_set")]
        assert [o["name"] for o in metadata["outputs"]] == expected
    finally:
        client.__exit__(None, None, None)
