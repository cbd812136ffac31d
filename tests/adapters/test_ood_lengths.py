"""Length-aware OOD p-values: the smaller of the pooled p-value and the p-value among the validation inputs of the
input's own token-length bucket, equal to a direct count; the rule's threshold abstains on its fraction of
validation and, for new exchangeable inputs, about that fraction; stored and rebuilt, damage refused."""

from __future__ import annotations

import pytest
import torch

from adapters.errors import OodStateError
from adapters.ood import OodScore, fit_ood_score
from adapters.ood.pvalues import length_edges

DIM = 8


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose spread grows with the token count (short and long inputs look different), and the counts."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 60, (n,), generator=generator)
    features = torch.randn(n, DIM, generator=generator, dtype=torch.float64) * (1 + lengths.double() / 30).unsqueeze(1)
    return features, lengths


@pytest.fixture(scope="module")
def score() -> OodScore:
    train, _ = _data(400, seed=0)
    validation, lengths = _data(300, seed=1)
    return fit_ood_score("mahalanobis", train, norm="none").calibrate(validation, lengths, length_buckets=4)


def test_the_p_value_is_the_smaller_of_the_pooled_and_the_own_bucket_count(score: OodScore) -> None:
    validation, val_lengths = _data(300, seed=1)
    val_scores = score.score(validation)
    edges = score.length_edges
    val_bucket = torch.bucketize(val_lengths.double(), edges)
    features, lengths = _data(50, seed=2)
    scores = score.score(features)
    expected = []
    for s, n in zip(scores.tolist(), lengths.tolist(), strict=True):
        bucket = int(torch.bucketize(torch.tensor([float(n)], dtype=torch.float64), edges))
        own = val_scores[val_bucket == bucket]
        pooled = (1 + int((val_scores >= s).sum())) / (val_scores.numel() + 1)
        expected.append(min(pooled, (1 + int((own >= s).sum())) / (own.numel() + 1)))
    torch.testing.assert_close(score.pvalue(scores, lengths), torch.tensor(expected, dtype=torch.float64))
    assert score.length_aware and len(score.length_references) == edges.numel() + 1 == 4


def test_the_threshold_abstains_on_the_fraction_of_validation_and_of_new_inputs(score: OodScore) -> None:
    validation, lengths = _data(300, seed=1)
    own = score.pvalue(score.score(validation), lengths)
    for fraction in (0.01, 0.05, 0.1):
        assert int((own < score.threshold(fraction)).sum()) == int(fraction * 300 + 1e-9)
    rates = []
    for seed in range(10, 30):  # new inputs from the validation distribution
        features, new_lengths = _data(300, seed=seed)
        rates.append(float((score.pvalue(score.score(features), new_lengths) < score.threshold(0.1)).double().mean()))
    assert abs(sum(rates) / len(rates) - 0.1) < 0.02


def test_a_length_aware_score_needs_the_lengths(score: OodScore) -> None:
    with pytest.raises(ValueError, match="length-aware: pass each input's token count"):
        score.pvalue(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="token counts"):
        fit_ood_score("mahalanobis", _data(100, 0)[0]).calibrate(_data(50, 1)[0], None, length_buckets=2)


def test_the_state_round_trips_and_damage_is_refused(score: OodScore) -> None:
    tensors, params = score.state()
    assert params["length_buckets"] == 4
    rebuilt = OodScore.from_state(tensors, params)
    features, lengths = _data(40, seed=3)
    values = score.score(features)
    assert torch.equal(rebuilt.pvalue(values, lengths), score.pvalue(values, lengths))
    assert rebuilt.threshold(0.05) == score.threshold(0.05)
    broken = {
        "a bucket missing": ({k: v for k, v in tensors.items() if k != "length_reference_3"}, params, "references"),
        "edges out of order": ({**tensors, "length_edges": tensors["length_edges"].flip(0)}, params, "increasing"),
        "not a partition": ({**tensors, "length_reference_0": tensors["length_reference_0"][1:]}, params, "partition"),
        "a wrong count": (tensors, {**params, "length_buckets": 3}, "length_edges"),
    }
    for bad_tensors, bad_params, needle in broken.values():
        with pytest.raises(OodStateError, match=needle):
            OodScore.from_state(bad_tensors, bad_params)


def test_length_edges_keep_every_bucket_at_least_min_count() -> None:
    lengths = torch.tensor([5] * 90 + [6] * 5 + [40] * 30)
    edges = length_edges(lengths, 4, min_count=20)
    buckets = torch.bucketize(lengths.double(), edges)
    assert all(int((buckets == b).sum()) >= 20 for b in range(edges.numel() + 1))
    assert edges.tolist() == [5.0]  # an edge at 6 would leave the five 6s alone: they join the 40s
    with pytest.raises(ValueError, match="at least 2"):
        length_edges(lengths, 1)
