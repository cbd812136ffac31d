"""Predictive quantities on hand-computed cases, and the abstention rules."""

from __future__ import annotations

import math

import pytest
import torch

from adapters import AbstentionRule, abstain, entropy, predictive


def _logits(*prob_rows: list[float]) -> torch.Tensor:
    """Per-sample logits ``(S, 1, C)`` whose softmax is the given probabilities."""
    return torch.tensor(prob_rows, dtype=torch.float64).log().unsqueeze(1)


def test_two_disagreeing_samples_by_hand() -> None:
    pred = predictive(_logits([0.9, 0.1], [0.1, 0.9]))
    h_sample = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))  # 0.325083
    torch.testing.assert_close(pred.probs, torch.tensor([[0.5, 0.5]]), atol=1e-6, rtol=0)
    assert pred.entropy.item() == pytest.approx(math.log(2), abs=1e-6)
    assert pred.entropy_normalized.item() == pytest.approx(1.0, abs=1e-6)
    assert pred.expected_entropy.item() == pytest.approx(h_sample, abs=1e-6)
    assert pred.mutual_information.item() == pytest.approx(math.log(2) - h_sample, abs=1e-6)
    # top class of p̄ is 0; its per-sample probabilities 0.9, 0.1: std 0.5657 / sqrt(2) = 0.4
    assert pred.mc_stderr.item() == pytest.approx(0.4, abs=1e-6)


def test_agreeing_samples_have_no_epistemic_part() -> None:
    pred = predictive(_logits([0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.7, 0.2, 0.1]))
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert pred.entropy.item() == pytest.approx(expected, abs=1e-6)
    assert pred.expected_entropy.item() == pytest.approx(expected, abs=1e-6)
    assert pred.mutual_information.item() == 0.0
    assert pred.mc_stderr.item() == pytest.approx(0.0, abs=1e-7)
    assert pred.entropy_normalized.item() == pytest.approx(expected / math.log(3), abs=1e-6)
    assert pred.label.item() == 0 and pred.confidence.item() == pytest.approx(0.7, abs=1e-6)


def test_probabilities_are_averaged_not_logits() -> None:
    logits = torch.tensor([[[4.0, 0.0]], [[0.0, 0.0]]])
    pred = predictive(logits)
    p_first = 1 / (1 + math.exp(-4))
    assert pred.probs[0, 0].item() == pytest.approx((p_first + 0.5) / 2, abs=1e-6)  # 0.741, not softmax(2,0)=0.881


def test_temperature_divides_logits() -> None:
    pred = predictive(torch.tensor([[2.0, 0.0]]), temperature=2.0)
    assert pred.probs[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-6)
    with pytest.raises(ValueError):
        predictive(torch.zeros(1, 2), temperature=0.0)


def test_single_sample_and_shapes() -> None:
    pred = predictive(torch.randn(5, 4))
    assert pred.probs.shape == (5, 4) and pred.num_samples == 1
    assert torch.all(pred.mc_stderr == 0) and torch.all(pred.mutual_information == 0)


def test_mutual_information_is_never_negative_and_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (1e-6, 0.1, 1.0, 10.0, 100.0):
        logits = scale * torch.randn(16, 256, 5, generator=g)
        logits[:, :64] = logits[:1, :64]  # identical samples: float error must not go negative
        pred = predictive(logits)
        assert torch.all(pred.mutual_information >= 0)
        assert torch.all(pred.mutual_information <= pred.entropy + 1e-6)
        assert torch.all(pred.entropy <= math.log(5) + 1e-6)
        assert torch.all((pred.entropy_normalized >= 0) & (pred.entropy_normalized <= 1 + 1e-6))


def test_entropy_handles_zero_probabilities() -> None:
    assert entropy(torch.tensor([1.0, 0.0])).item() == 0.0


def test_abstention_rules_and_reasons() -> None:
    pred = predictive(torch.cat([_logits([0.9, 0.1], [0.1, 0.9]), _logits([0.95, 0.05], [0.95, 0.05])], dim=1))
    rules = [AbstentionRule("max_prob", 0.6), AbstentionRule("mutual_information", 0.1)]
    flags, reasons = abstain(pred, rules)
    assert flags.tolist() == [True, False]
    assert reasons == ["max_prob below 0.6", None]
    flags, reasons = abstain(pred, [AbstentionRule("mutual_information", 0.1)])
    assert flags.tolist() == [True, False] and reasons[0] == "mutual_information above 0.1"
    flags, _ = abstain(pred, [AbstentionRule("entropy", 0.5)])
    assert flags.tolist() == [True, False]
    flags, reasons = abstain(pred, [])
    assert flags.tolist() == [False, False] and reasons == [None, None]
    with pytest.raises(ValueError):
        AbstentionRule("variance", 0.1)
