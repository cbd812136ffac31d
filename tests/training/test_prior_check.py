"""``--prior marglik-checked`` (the default): the chosen δ's validation NLL is never above the MAP's, its
validation ECE at most ``--prior-ece-slack`` above the MAP's, and the bundle records why it won."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adapters import load_bundle
from training.cli import main
from training.config import TrainConfig
from training.encoding import make_loader
from training.inference import labels_of
from training.methods.laplace import CHECKED_METHOD, MAP_LIMIT_DECADES, ValidationFit, _checked_prior, check_prior
from training.methods.laplace_fit import fit_laplace
from training.metrics import ece, nll
from training.session import fit_map, prepare

TINY = [
    "--train-limit", "96", "--eval-limit", "32", "--validation-size", "96", "--epochs", "1", "--rank", "2",
    "--targets", "query,value", "--laplace-limit", "32", "--max-length", "32", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def session_and_fit(tiny_base: Path):
    """A tiny MAP with its Kronecker Laplace fit, and the same fit with a marglik δ made 10⁴× too weak."""
    config = TrainConfig.from_flat(
        base_model=str(tiny_base), train_limit=96, eval_limit=32, validation_size=96, epochs=1, rank=2,
        targets=["query", "value"], laplace_limit=32, max_length=32, progress=False, out="unused",
    )  # fmt: skip
    config.validate()
    session = prepare(config)
    fit_map(session)
    loader = make_loader(session.train[:32], session.encoder, 32, shuffle=False)
    fit = fit_laplace(session.model, loader, "kron", n_data=len(session.train), progress=False)
    too_wide = replace(fit, info=fit.info | {"prior_precision": fit.info["prior_precision"] * 1e-4})
    return session, fit, too_wide


def _validation_nll(session, posterior, num_samples: int = 256) -> float:
    """An independent recomputation: the GLM predictive on the whole validation split."""
    outputs = session.linearisation("validation", session.validation).outputs(
        posterior, num_samples, session.config.seed
    )
    return nll(outputs.distribution().probs, labels_of(session.validation))


def _curve(marglik: float, excess: dict[float, tuple[float, float]], reference: ValidationFit, tried: dict):
    """A synthetic validation curve: (NLL, ECE) above the reference's by ``excess[decade]`` (0 elsewhere)."""

    def score_at(delta: float) -> ValidationFit:
        decade = round(math.log10(delta / marglik), 6)
        extra_nll, extra_ece = excess.get(decade, (0.0, 0.0))
        tried[decade] = ValidationFit(reference.nll + extra_nll, reference.ece + extra_ece)
        return tried[decade]

    return score_at


MAP_FIT = ValidationFit(nll=0.40, ece=0.02)


def test_check_picks_the_widest_prior_no_worse_than_the_map() -> None:
    """On a synthetic validation-NLL curve (too wide at marglik, better than the MAP a decade above, best
    further up): the first δ no worse than the MAP wins, and every wider δ tried was worse."""
    marglik, tried = 2.0, {}
    excess = {0.0: (0.02, 0.0), 0.5: (0.004, 0.0), 1.0: (-0.003, 0.0), 1.5: (-0.006, 0.0), 2.0: (-0.004, 0.0)}
    delta, choice = check_prior(_curve(marglik, excess, MAP_FIT, tried), marglik, MAP_FIT, 0.005)
    assert delta == pytest.approx(marglik * 10) and tried[1.0].nll <= MAP_FIT.nll
    assert sorted(tried) == [0.0, 0.5, 1.0] and all(tried[d].nll > MAP_FIT.nll for d in (0.0, 0.5))
    assert "worse than the MAP's NLL 0.4000, ECE 0.0200" in choice and "× 10^1" in choice


def test_check_also_refuses_a_posterior_that_hurts_calibration() -> None:
    """A δ whose NLL beats the MAP's but whose ECE exceeds the MAP's by more than the slack is passed over
    (the NLL-only check kept it: validation NLL does not protect ECE)."""
    marglik, tried = 2.0, {}
    excess = {0.0: (-0.001, 0.03), 0.5: (-0.002, 0.006), 1.0: (-0.001, 0.004)}
    delta, _ = check_prior(_curve(marglik, excess, MAP_FIT, tried), marglik, MAP_FIT, 0.005)
    assert delta == pytest.approx(marglik * 10) and sorted(tried) == [0.0, 0.5, 1.0]
    nll_only, _ = check_prior(_curve(marglik, excess, MAP_FIT, {}), marglik, MAP_FIT, 1.0)
    assert nll_only == marglik


def test_check_keeps_a_marglik_prior_that_does_not_hurt() -> None:
    delta, choice = check_prior(lambda delta: ValidationFit(0.39, 0.021), 2.0, MAP_FIT, 0.005)
    assert delta == 2.0 and choice.startswith("marglik 2 kept")


def test_check_ends_at_the_map_limit_when_every_posterior_is_worse() -> None:
    """An NLL that approaches the MAP's from above (as on an under-confident fit) ends at the MAP limit."""
    delta, choice = check_prior(lambda delta: ValidationFit(0.40 + 1e-3 / delta, 0.02), 1.0, MAP_FIT, 0.005)
    assert delta == pytest.approx(10**MAP_LIMIT_DECADES) and "the MAP limit" in choice


@pytest.mark.parametrize("first_passing", [1, 2, 3, 5, 7, 12, 17, 23, 24])
def test_the_ladder_search_finds_the_rung_a_step_by_step_climb_finds_in_fewer_scores(first_passing: int) -> None:
    """NLL falling steadily towards the MAP's: the first passing half-decade rung wins, as a climb one rung at a
    time (the previous search) would find it, in at most 11 scores instead of ``first_passing + 1``."""
    marglik, tried = 3.0, {}
    excess = {rung / 2: (1e-3 * (first_passing - rung), 0.0) for rung in range(first_passing)}
    delta, choice = check_prior(_curve(marglik, excess, MAP_FIT, tried), marglik, MAP_FIT, 0.005)
    assert delta == pytest.approx(marglik * 10 ** (first_passing / 2))
    assert first_passing / 2 in tried and (first_passing - 1) / 2 in tried  # its rung passed, the one below did not
    assert len(tried) <= 11 and f"× 10^{first_passing / 2:g}" in choice


def test_a_too_wide_marglik_prior_on_a_tiny_model_is_narrowed_to_no_worse_than_the_map(session_and_fit) -> None:
    """A real tiny fit whose marglik δ is made 10⁴× too weak; the record is checked against a recomputation."""
    session, _, too_wide = session_and_fit
    labels = labels_of(session.validation)
    map_probs = session.map_outputs("validation", session.validation).distribution().probs
    map_nll, map_ece = nll(map_probs, labels), ece(map_probs, labels)
    marglik = too_wide.info["prior_precision"]
    assert _validation_nll(session, too_wide.with_prior(marglik)) > map_nll, "the setup must make marglik too wide"
    posterior, info = _checked_prior(session, too_wide, 256)
    delta = info["prior_precision"]
    assert delta > marglik and set(posterior.prior_precision) == {delta}
    # no worse than the MAP: exactly, or at the MAP limit to float rounding (this under-trained MAP is one
    # where every finite-width posterior is slightly worse)
    assert _validation_nll(session, posterior) <= map_nll + 1e-6
    assert info["marglik_prior_precision"] == marglik and info["ece_slack"] == 0.005
    assert info["map_validation"] == pytest.approx({"nll": map_nll, "ece": map_ece}, abs=1e-6)
    tried = {float(k): v for k, v in info["checked_validation"].items()}
    assert min(tried) == pytest.approx(marglik, rel=1e-5) and max(tried) == pytest.approx(delta, rel=1e-5)
    assert tried[min(tried)]["nll"] == pytest.approx(_validation_nll(session, too_wide.with_prior(marglik)), abs=1e-6)
    assert tried[max(tried)]["ece"] <= map_ece + 0.005 + 1e-6


def test_the_map_limit_is_the_map(session_and_fit) -> None:
    """δ at the check's upper end gives the MAP's logits: the check can always end no worse than the MAP."""
    session, fit, _ = session_and_fit
    limit = fit.with_prior(fit.info["prior_precision"] * 10**MAP_LIMIT_DECADES)
    draws = session.linearisation("validation", session.validation).outputs(limit, 16, 0).logits
    map_logits = session.map_outputs("validation", session.validation).logits
    torch.testing.assert_close(draws, map_logits.expand_as(draws), atol=1e-5, rtol=0)


def test_the_default_run_records_the_prior_choice_in_the_bundle(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert main(["--out", str(out), "--base-model", str(tiny_base), *TINY]) == 0
    manifest = load_bundle(out).manifest
    record = manifest.eval.training.posterior
    assert record["prior_method"] == CHECKED_METHOD
    assert manifest.posterior.prior_precision == pytest.approx(record["prior_precision"])
    chosen, map_fit = record["checked_validation"][f"{record['prior_precision']:.6g}"], record["map_validation"]
    assert chosen["nll"] <= map_fit["nll"] + 1e-6 and chosen["ece"] <= map_fit["ece"] + record["ece_slack"] + 1e-6
    assert f"Prior precision: {record['prior_choice']}" in (out / "report.md").read_text()


def test_layerwise_prior_needs_plain_marglik(capsys, tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path / "b"), "--prior-structure", "layerwise"]) == 2
    assert "--prior-structure layerwise needs --prior marglik" in capsys.readouterr().err
