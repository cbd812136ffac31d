"""Laplace posteriors over the cores with laplace-torch, converted into ``adapters`` posterior families.

laplace-torch 0.3 (default curvlinops GGN backend) fits ``kron`` curvature on a model whose only trainable
parameters are the posterior's (the cores, and the head when asked), and tunes the prior precision by
maximising the marginal likelihood (docs/methods.md, Laplace). ``diag`` and ``full`` use the exact GGN from
per-example Jacobians (:mod:`training.methods.exact_ggn`), tested against laplace-torch's own ``diag`` and
``full``: laplace-torch computes them far more slowly on these models. The fitted posterior is then stored in
the bundle's own families, so the server never refits anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from adapters import KronFactors, KronPosterior, LoraXSClassifier, Posterior
from training.encoding import batch_logits
from training.methods.exact_ggn import fit_exact
from training.scopes import Timer, trainable

STRUCTURES = ("diag", "kron", "full")
EXACT = ("diag", "full")  # fitted with our exact per-example-Jacobian GGN; kron with laplace-torch


class DictInputModel(nn.Module):
    """laplace-torch hands a Hugging Face batch (a MutableMapping) to the model's forward."""

    def __init__(self, model: LoraXSClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch) -> torch.Tensor:
        device = next(self.model.parameters()).device  # laplace-torch moves the labels, not a mapping
        return batch_logits(self.model, {k: v.to(device) for k, v in batch.items() if k != "labels"})


@dataclass
class LaplaceFit:
    """A fitted Laplace posterior, its record, and the same curvature under another prior precision."""

    posterior: Posterior
    laplace: Any  # the fitted laplace-torch object (None for diag and full, which do not use it)
    info: dict[str, Any] = field(default_factory=dict)
    with_prior: Callable[[float], Posterior] | None = None  # the posterior for another (scalar) prior precision


def fit_laplace(
    model: LoraXSClassifier,
    train_loader: DataLoader,
    structure: str,
    *,
    include_head: bool = False,
    n_data: int | None = None,
    prior_structure: str = "scalar",
    marglik_steps: int = 100,
    progress: bool = True,
) -> LaplaceFit:
    """Fit a Laplace posterior of ``structure`` (``diag`` | ``kron`` | ``full``) around the model's MAP.

    ``train_loader`` yields encoded batches (``training.encoding.make_loader``). When it holds a subset of
    M of the N training examples, pass ``n_data=N``: the curvature and the data term are estimated on the M
    and scaled by N/M before the prior precision is tuned, so the posterior is the one for N examples.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown Laplace structure {structure!r}; choose one of {list(STRUCTURES)}")
    params = model.posterior_parameters(include_head=include_head)
    if structure in EXACT:  # laplace-torch is far slower on these: see training.methods.exact_ggn
        if prior_structure != "scalar":
            raise ValueError(f"the {structure} structure supports a scalar prior precision only")
        with Timer() as curvature, trainable(model, params.values()):
            posterior, info, at = fit_exact(model, train_loader, params, structure, n_data=n_data, progress=progress)
        info["fit_seconds"] = round(curvature.elapsed, 2)
        return LaplaceFit(posterior, None, info, at)
    with trainable(model, params.values()):
        model.eval()
        with Timer() as curvature:
            la = laplace_torch(model, structure)
            la.fit(train_loader, progress_bar=progress)
            subset_size = int(la.n_data)
            if n_data is not None and n_data != subset_size:
                _scale_to(la, n_data)
        with Timer() as marglik:
            la.optimize_prior_precision(method="marglik", prior_structure=prior_structure, n_steps=marglik_steps)
    names = _laplace_order(la, params)
    mean = {name: params[name].detach().clone() for name in names}
    prior = la.prior_precision.detach().cpu().flatten().tolist()
    posterior = _convert(la, mean, prior)

    def at(delta: float) -> Posterior:
        return KronPosterior(mean, posterior.factors, posterior.scale, delta)

    info = {
        "structure": structure,
        "prior_precision": prior[0] if len(prior) == 1 else prior,
        "prior_structure": prior_structure,
        "log_marginal_likelihood": float(la.log_marginal_likelihood().item()),
        "n_data": int(la.n_data),
        "curvature_examples": subset_size,
        "n_params": int(la.n_params),
        "fit_seconds": round(curvature.elapsed, 2),
        "marglik_seconds": round(marglik.elapsed, 2),
    }
    return LaplaceFit(posterior, la, info, at)


def laplace_torch(model: LoraXSClassifier, structure: str):
    """An unfitted laplace-torch ``Laplace`` over the model's currently trainable parameters."""
    from laplace import Laplace  # imported here: laplace-torch imports its three curvature backends

    return Laplace(
        DictInputModel(model), "classification", subset_of_weights="all", hessian_structure=structure,
        dict_key_y="labels",
    )  # fmt: skip


def _scale_to(la, n_data: int) -> None:
    """Rescale a fit on M examples to N: curvature and summed loss are sums over examples."""
    factor = n_data / la.n_data
    la.H = la.H * factor
    la.loss = la.loss * factor
    la.n_data = n_data


def _convert(la, mean: dict[str, torch.Tensor], prior: list[float]) -> Posterior:
    kron = la.H  # KronDecomposed of the curvature; the posterior precision is H · H_factor + δ
    factors = {
        name: KronFactors(
            tuple(v.detach().clone() for v in kron.eigenvectors[i]),
            tuple(v.detach().clone() for v in kron.eigenvalues[i]),
        )
        for i, name in enumerate(mean)
    }
    return KronPosterior(mean, factors, float(la._H_factor), prior if len(prior) > 1 else prior[0])


def _laplace_order(la, params: dict[str, nn.Parameter]) -> list[str]:
    """Our block names in the order laplace-torch flattened the parameters (matched by identity)."""
    by_id = {id(p): name for name, p in params.items()}
    names = [by_id[id(p)] for p in la.params]
    if sorted(names) != sorted(params):
        raise RuntimeError("laplace-torch saw other parameters than the posterior's")
    return names
