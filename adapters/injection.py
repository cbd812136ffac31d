"""Injection of LoRA-XS layers into any ``PreTrainedModel``: targets by module-name pattern, projections from
the pretrained weights, and in-place wrapping (``setattr`` on the parent), so the base model's own code runs
unchanged."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from adapters.config import LoraXSConfig
from adapters.defaults import CORE_INIT_STD
from adapters.errors import TargetNotFoundError
from adapters.layer import LoraXSLinear
from adapters.projections import Projection, build_projection


def _pattern_matches(pattern: str, name: str) -> bool:
    """``re:<regex>`` matches the full name; a plain pattern matches the name or a dotted suffix of it."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, patterns: Sequence[str]) -> dict[str, list[str]]:
    """Map each pattern to the names of the ``nn.Linear`` modules (or wrapped layers) it selects.

    Raises:
        TargetNotFoundError: a pattern matches nothing, or matches a module that is not ``nn.Linear``.
    """
    linears, others = _linear_and_other_names(model)
    matches = {p: [n for n in linears if _pattern_matches(p, n)] for p in patterns}
    empty = [p for p, names in matches.items() if not names]
    if empty:
        wrong_type = {p: [n for n in others if _pattern_matches(p, n)][:3] for p in empty}
        hints = "; ".join(
            f"{p!r} matches non-linear modules {found}" if found else f"{p!r} matches nothing"
            for p, found in wrong_type.items()
        )
        raise TargetNotFoundError(
            f"target patterns select no nn.Linear: {hints}. Linear module names end in: {linear_suffixes(model)}"
        )
    return matches


def linear_suffixes(model: nn.Module) -> list[str]:
    """The distinct last components of the model's ``nn.Linear`` names (what target patterns can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_and_other_names(model)[0]})


def _linear_and_other_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """Module names split into targetable linears (plain or already wrapped) and everything else."""
    modules = dict(model.named_modules())
    wrapped = {name for name, m in modules.items() if isinstance(m, LoraXSLinear)}
    linears, others = [], []
    for name, module in modules.items():
        inside_wrapper = name.rpartition(".")[0] in wrapped  # a wrapped layer's own base/core
        if name in wrapped or (isinstance(module, nn.Linear) and not inside_wrapper):
            linears.append(name)
        else:
            others.append(name)
    return linears, others


def target_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the modules the patterns select, each once, in model order."""
    selected = {n for names in find_targets(model, patterns).values() for n in names}
    return [name for name, _ in model.named_modules() if name in selected]


@dataclass
class InjectionReport:
    """What :func:`inject_lora_xs` wrapped: the module names, and which pattern selected which modules."""

    wrapped: list[str]
    matches: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        per_pattern = ", ".join(f"{p}: {len(n)}" for p, n in self.matches.items())
        return f"wrapped {len(self.wrapped)} linear layers ({per_pattern})"


def inject_lora_xs(
    model: nn.Module,
    target_modules: Sequence[str],
    projections: Mapping[str, Projection] | None = None,
    *,
    alpha: float = 16.0,
    init_std: float = CORE_INIT_STD,
    seed: int = 0,
) -> InjectionReport:
    """Wrap the selected ``nn.Linear`` modules of ``model`` in :class:`LoraXSLinear`, in place.

    Args:
        model: any ``nn.Module`` (typically a ``PreTrainedModel``); names below are relative to it.
        target_modules: patterns, see :func:`find_targets`.
        projections: module name → its :class:`Projection` for single mode (training); ``None`` makes host
            layers that only serve batched rows.
        alpha, init_std, seed: single-mode scaling and core initialisation (a seeded generator).
    """
    matches = find_targets(model, target_modules)
    names = target_names(model, target_modules)
    missing = [n for n in names if projections is not None and n not in projections]
    if missing:
        raise TargetNotFoundError(f"no projection given for targeted modules {missing[:5]}")
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for name in names:
        if isinstance(modules[name], LoraXSLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        layer = LoraXSLinear(
            modules[name],
            projections[name] if projections is not None else None,
            alpha=alpha,
            init_std=init_std,
            generator=generator,
        )
        setattr(modules[parent_name] if parent_name else model, child, layer)
    return InjectionReport(wrapped=names, matches=matches)


def lora_xs_layers(model: nn.Module) -> dict[str, LoraXSLinear]:
    """Name → wrapped layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraXSLinear)}


def compute_projections(
    model: nn.Module,
    module_names: Iterable[str],
    config: LoraXSConfig,
    input_moments: Mapping[str, Tensor] | None = None,
) -> dict[str, Projection]:
    """Projection of every named linear layer from its pretrained weight (docs/methods.md, projection families)."""
    modules = dict(model.named_modules())
    projections = {}
    for index, name in enumerate(module_names):
        linear = modules[name]
        linear = linear.base if isinstance(linear, LoraXSLinear) else linear
        projections[name] = build_projection(
            linear.weight,
            config.rank,
            config.projection,
            seed=config.seed + 1000 * index,
            input_moment=None if input_moments is None else input_moments.get(name),
        )
    return projections
