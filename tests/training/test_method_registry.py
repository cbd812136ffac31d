"""Every --posterior name has exactly one registered method, and the scopes every method uses do what
they promise."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from training.config import ConfigError, HeadCoverage, PosteriorMethod, TrainConfig, flags
from training.methods import REGISTRY, get_method
from training.objectives import AdapterDropout
from training.scopes import restored, trainable


def test_every_posterior_name_has_its_method() -> None:
    assert set(REGISTRY) == set(PosteriorMethod)
    assert all(method.name == name for name, method in REGISTRY.items())


def test_the_posterior_help_and_the_head_check_follow_each_methods_declaration() -> None:
    help = {flag.name: flag.help for flag in flags()}
    assert all(str(method) in help["posterior"] for method in PosteriorMethod)
    assert "vi (mean-field variational)" in help["posterior"]
    for method in PosteriorMethod:
        config = TrainConfig.from_flat(posterior=str(method), posterior_head=True)
        if method.head == HeadCoverage.NEVER:
            assert str(method) in help["posterior-head"]
            with pytest.raises(ConfigError, match=f"not available for --posterior {method} \\(cores only\\)"):
                config.validate(needs_out=False)
        else:
            config.validate(needs_out=False)


def test_only_mc_dropout_trains_its_map_with_another_loss() -> None:
    config = TrainConfig()
    own = {name for name, method in REGISTRY.items() if method.map_objective(config) is not None}
    assert own == {PosteriorMethod.MC_DROPOUT}
    assert isinstance(get_method("mc-dropout").map_objective(config), AdapterDropout)


def test_an_unknown_method_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown --posterior 'laplace-huge'"):
        get_method("laplace-huge")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"posterior": "bayesian-lora", "posterior_head": True}, "not available for --posterior bayesian-lora"),
        ({"blora_noise_init": 0.02, "blora_noise_cap": 0.01}, "0 < --blora-noise-init < --blora-noise-cap"),
        ({"blora_prior_std": 0.0}, "--blora-prior-std"),
        ({"posterior": "ensemble", "train_projections": True}, "a bundle holds one set of projections"),
    ],
)
def test_bayesian_lora_and_trained_projection_settings_are_checked(flags: dict, message: str) -> None:
    config = TrainConfig.from_flat(**flags)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.validate(needs_out=False)


def test_trainable_and_restored_undo_what_happened_inside_even_on_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    first, second = model[0].weight, model[1].weight
    model[1].bias.requires_grad_(False)
    before = first.detach().clone()
    with pytest.raises(RuntimeError), trainable(model, [first]), restored({"w": first}) as saved:
        assert first.requires_grad and not second.requires_grad and not model[1].bias.requires_grad
        with torch.no_grad():
            first.add_(1.0)
        assert torch.equal(saved["w"], before)
        raise RuntimeError("a fit failed half way")
    assert torch.equal(first, before)
    assert second.requires_grad and not model[1].bias.requires_grad  # the flags as they were
