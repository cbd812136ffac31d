"""The default calibration's validation rule: each candidate scored by its per-example validation NLL
(temperatures cross-fitted), simplest first, a candidate kept only when it wins by more than twice the
standard error of the paired difference."""

from __future__ import annotations

import math

import pytest
import torch

from training.calibration import (
    CANDIDATES,
    MARGIN_STANDARD_ERRORS,
    choose_predictive,
    cross_fitted_nll,
    example_nll,
    fit_temperature,
)


def _task(n: int, seed: int = 0, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(true logits): the true logits are calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 1.5
    labels = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    return logits, labels


def test_example_nll_is_the_mixture_nll_of_each_example() -> None:
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(4, 6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = [-math.log(logits[:, i].div(2.0).softmax(-1)[:, labels[i]].mean()) for i in range(6)]
    torch.testing.assert_close(example_nll(logits, labels, 2.0), torch.tensor(expected, dtype=torch.float64))


def test_cross_fitted_nll_scores_each_half_with_the_other_halfs_temperature() -> None:
    logits, labels = _task(200, seed=2)
    logits = (3 * logits).unsqueeze(0)
    scored = cross_fitted_nll(logits, labels, folds=2, seed=7)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(7))
    first, second = order[:100], order[100:]
    t_second, t_first = (
        fit_temperature(logits[:, second], labels[second]),
        fit_temperature(logits[:, first], labels[first]),
    )
    torch.testing.assert_close(scored[first], example_nll(logits[:, first], labels[first], t_second))
    torch.testing.assert_close(scored[second], example_nll(logits[:, second], labels[second], t_first))
    # in-sample, a temperature never loses to T = 1; cross-fitted, it is scored as it would do on new data
    assert example_nll(logits, labels, fit_temperature(logits, labels)).mean() <= example_nll(logits, labels).mean()


def test_an_overconfident_map_gets_a_temperature() -> None:
    logits, labels = _task(2000, seed=3)
    choice = choose_predictive((4 * logits).unsqueeze(0), None, labels)
    assert choice.choice == "map+temperature" and list(choice.candidates) == ["map", "map+temperature"]
    record = choice.candidates["map+temperature"]
    assert record["temperature"] == pytest.approx(4.0, rel=0.15)
    assert record["gain"] > MARGIN_STANDARD_ERRORS * record["standard_error"] > 0


def test_a_posterior_wins_where_the_overconfidence_depends_on_the_input() -> None:
    """Half the inputs are 5× overconfident and the posterior is wide exactly there (epistemic): one temperature
    cannot fix half the inputs without spoiling the other half, the posterior can; a posterior equal to the MAP
    never replaces it."""
    logits, labels = _task(2000, seed=4)
    hard = (torch.arange(2000) % 2 == 0).float().unsqueeze(1)
    map_logits = (logits * (1 + 4 * hard)).unsqueeze(0)
    draws = map_logits + 8 * hard * torch.randn(32, *logits.shape, generator=torch.Generator().manual_seed(5))
    choice = choose_predictive(map_logits, draws, labels)
    assert list(choice.candidates) == list(CANDIDATES) and choice.choice == "posterior", choice.candidates
    nll = {name: record["nll"] for name, record in choice.candidates.items()}
    assert nll["posterior"] < nll["map+temperature"] < nll["map"]
    assert choice.candidates["posterior+temperature"]["gain"] <= 0  # a temperature on top adds nothing here
    same = choose_predictive(map_logits, map_logits.expand(8, -1, -1), labels)
    assert same.choice == "map+temperature" and same.candidates["posterior"]["gain"] < 0


def test_a_gain_inside_its_noise_keeps_the_simpler_predictive() -> None:
    """277 validation examples (a new user's carved set), a calibrated MAP, and a "posterior" that sharpens some
    examples and softens others at random: its NLL gain, whatever its sign, is inside twice its standard error,
    so the MAP stays; the same rule takes a predictive whose gain is clear (an overconfident MAP's temperature)."""
    logits, labels = _task(277, seed=6)
    g = torch.Generator().manual_seed(7)
    jitter = torch.where(torch.rand(277, 1, generator=g) < 0.5, 0.8, 1.25)
    choice = choose_predictive(logits.unsqueeze(0), (logits * jitter).unsqueeze(0).expand(4, -1, -1), labels)
    record = choice.candidates["posterior"]
    assert abs(record["gain"]) < MARGIN_STANDARD_ERRORS * record["standard_error"], record
    assert choice.choice == "map", choice.candidates
    assert choose_predictive((3 * logits).unsqueeze(0), None, labels).choice == "map+temperature"


def test_a_temperature_fits_logits_with_masked_choices() -> None:
    """Multiple-choice logits carry -inf for the choices an item lacks: the fitted temperature is finite and the
    one fitted with those choices at a finite -1e4 instead (was NaN: -inf in the gradient of T)."""
    logits, labels = _task(400, seed=8, classes=4)
    three = torch.arange(400) % 2 == 0  # half the items have three choices
    labels = torch.where(three & (labels == 3), 0, labels)
    masked = (3 * logits).masked_fill(three.unsqueeze(1) & (torch.arange(4) == 3), float("-inf")).unsqueeze(0)
    temperature = fit_temperature(masked, labels)
    assert math.isfinite(temperature)
    assert temperature == pytest.approx(fit_temperature(masked.clamp_min(-1e4), labels), rel=1e-6)
