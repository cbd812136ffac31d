"""Fingerprints of a base model: sha256 digests of the frozen layers an adapter touches, so a bundle can be
checked against the base it is loaded onto."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from adapters.layer import LoraXSLinear


def module_digests(model: nn.Module, module_names: Iterable[str] | None = None) -> dict[str, str]:
    """sha256 of each named linear layer's weight and bias (float32 bytes, with shapes); all linear layers
    when ``module_names`` is ``None``.

    A server computes these once, before casting the base to a lower precision, and can then fingerprint
    any adapter's module set without keeping float32 weights around.
    """
    modules = dict(model.named_modules())
    if module_names is None:
        module_names = [n for n, m in modules.items() if _is_adaptable_linear(n, m, modules)]
    digests = {}
    for name in module_names:
        linear = modules[name]
        linear = linear.base if isinstance(linear, LoraXSLinear) else linear
        digest = hashlib.sha256()
        for tensor in (linear.weight, linear.bias):
            if tensor is not None:
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digests[name] = digest.hexdigest()
    return digests


def _is_adaptable_linear(name: str, module: nn.Module, modules: Mapping[str, nn.Module]) -> bool:
    """A wrapped layer, or a plain linear layer that is not the inside of a wrapped one."""
    if isinstance(module, LoraXSLinear):
        return True
    return isinstance(module, nn.Linear) and not isinstance(modules.get(name.rpartition(".")[0]), LoraXSLinear)


def combine_digests(digests: Mapping[str, str], module_names: Iterable[str]) -> str:
    """The fingerprint of a module set from per-module digests (order-independent)."""
    lines = "".join(f"{name}:{digests[name]}\n" for name in sorted(module_names))
    return hashlib.sha256(lines.encode()).hexdigest()


def base_fingerprint(model: nn.Module, module_names: Iterable[str]) -> str:
    """sha256 over the frozen tensors an adapter touches: the named layers' weights and biases.

    Computed on float32 copies, so fingerprint the model before casting it to a lower precision.
    """
    names = list(module_names)
    return combine_digests(module_digests(model, names), names)
