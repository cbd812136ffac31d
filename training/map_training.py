"""MAP training of the LoRA-XS cores and the head, with accelerate.

Runs on the CPU, one GPU (bf16 autocast when asked) or several (``accelerate launch``). The checkpoint with
the best validation score is kept (in memory) and restored at the end; training stops early when the
validation score has not improved for ``patience`` epochs. With ``--select-by last`` (or ``--checkpoint-epochs``)
every epoch runs and the last is kept, as the published long-run protocol trains. The test split is never
looked at here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from adapters import LoraXSClassifier
from training.config import OptimisationConfig, SelectBy
from training.data import Example
from training.encoding import Encoder, batch_logits, make_loader
from training.objectives import CrossEntropy, Objective
from training.scopes import Timer

WARMUP_FRACTION = 0.06  # of the steps, a linear warm-up of the learning rate


@dataclass
class MapResult:
    """What MAP training did: the epoch kept, each epoch's validation scores, and the trainable state at each
    of ``--checkpoint-epochs`` (parameter name → tensor)."""

    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def train_map(
    model: LoraXSClassifier,
    train: list[Example],
    validation: list[Example],
    encoder: Encoder,
    settings: OptimisationConfig,
    *,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    objective: Objective | None = None,
) -> MapResult:
    """Train in place; on return ``model`` holds the best checkpoint (by validation ``select_by``; the last
    epoch for ``last`` or with ``checkpoint_epochs``, which also keeps the states at those epochs).

    ``objective`` is the per-batch loss (cross-entropy by default; :class:`AdapterDropout` for MC dropout).
    With ``settings.train_projections`` (L-LoRA-S) every layer's ``A`` and ``B`` train too, and are frozen
    again (at their best-checkpoint values) on return.
    """
    model.freeze_base()
    scope = projection_parameters(model) if settings.train_projections else nullcontext([])
    with scope as projections:
        return _train(model, train, validation, encoder, settings, seed, accelerator, progress, objective, projections)


def _train(
    model: LoraXSClassifier,
    train: list[Example],
    validation: list[Example],
    encoder: Encoder,
    settings: OptimisationConfig,
    seed: int,
    accelerator: Accelerator | None,
    progress: bool,
    objective: Objective | None,
    projections: list[torch.nn.Parameter],
) -> MapResult:
    objective = objective or CrossEntropy()
    accelerator = accelerator or Accelerator(mixed_precision=settings.mixed_precision)
    torch.manual_seed(seed)
    cores = [layer.core.weight for layer in model.lora_layers.values()]
    groups = [{"params": cores, "lr": settings.lr}]
    if model.train_head:
        groups.append({"params": list(model.head.parameters()), "lr": settings.head_lr})
    if projections:  # no weight decay: it would pull A and B towards zero, away from the base's factors
        groups.append({"params": projections, "lr": settings.projection_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    loader = make_loader(train, encoder, settings.batch_size, shuffle=True, seed=seed)
    sampler = loader.batch_sampler  # keep our own handle: accelerate may wrap it for several processes
    total_steps = settings.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps, WARMUP_FRACTION))
    prepared, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    result, best_score, best_state, stale = MapResult(best_epoch=0), -math.inf, None, 0
    keep_last = settings.select_by == SelectBy.LAST or settings.checkpoint_epochs is not None
    checkpoint_epochs = set(settings.checkpoint_epochs or ())
    with Timer() as timer:
        for epoch in range(1, settings.epochs + 1):
            sampler.set_epoch(epoch)
            prepared.train()
            train_loss = run_epoch(
                prepared, loader, optimizer, scheduler, objective, backward=accelerator.backward,
                desc=f"epoch {epoch}/{settings.epochs}", progress=progress and accelerator.is_main_process,
            )  # fmt: skip
            scores = validation_scores(accelerator.unwrap_model(prepared), validation, encoder, settings.batch_size * 2)
            scores.update(epoch=epoch, train_loss=train_loss)
            result.history.append(scores)
            score = -scores["nll"] if settings.select_by == SelectBy.NLL else scores["accuracy"]
            accelerator.print(
                f"epoch {epoch}: train loss {scores['train_loss']:.4f}, validation accuracy {scores['accuracy']:.4f}, "
                f"NLL {scores['nll']:.4f}"
            )
            if epoch in checkpoint_epochs:
                result.checkpoints[epoch] = _trainable_state(model)
            if keep_last:  # every epoch runs; the model ends at the last
                result.best_epoch = epoch
            elif score > best_score:
                best_score, best_state, stale, result.best_epoch = score, _trainable_state(model), 0, epoch
            else:
                stale += 1
                if stale >= settings.patience:
                    accelerator.print(f"early stop: no validation improvement for {stale} epochs")
                    break
        if best_state is not None:
            model.load_state_dict(best_state, strict=False)
    result.seconds = timer.elapsed
    model.eval()
    return result


@contextmanager
def projection_parameters(model: LoraXSClassifier) -> Iterator[list[torch.nn.Parameter]]:
    """Within the block every adapted layer's ``A`` and ``B`` are trainable parameters (L-LoRA-S), starting
    from their current values; afterwards they are frozen buffers again, holding what training left."""
    names = ("lora_A", "lora_B")
    layers = list(model.lora_layers.values())
    params = []
    for layer in layers:
        for name in names:
            value = getattr(layer, name)
            delattr(layer, name)
            layer.register_parameter(name, torch.nn.Parameter(value.detach().clone()))
            params.append(getattr(layer, name))
    try:
        yield params
    finally:
        for layer in layers:
            for name in names:
                value = getattr(layer, name).detach().clone()
                delattr(layer, name)
                layer.register_buffer(name, value)


def run_epoch(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    objective: Objective,
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    device: torch.device | None = None,
    desc: str = "epoch",
    progress: bool = True,
    on_step: Callable[[], None] | None = None,
) -> float:
    """One pass of ``optimizer`` steps over ``loader``; returns the mean loss per example.

    Batches are moved to ``device`` when given (an accelerate-prepared loader places them itself);
    ``on_step`` runs after every step (SWAG takes its snapshots there).
    """
    running, seen = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not progress)
    for batch in bar:
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        loss = objective.loss(model, batch)
        backward(loss)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step()
        count = len(batch["labels"])
        running, seen = running + loss.item() * count, seen + count
        bar.set_postfix(loss=f"{running / seen:.4f}")
    return running / max(seen, 1)


def run_epochs(
    model: torch.nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    objective: Objective,
    *,
    epochs: int,
    seed: int,
    name: str,
    progress: bool = True,
    on_step: Callable[[], None] | None = None,
) -> list[float]:
    """``epochs`` passes of a phase after the MAP (SWAG, VI): the model in train mode, the global generator
    seeded (dropout), the length-grouped sampler told each epoch; returns each epoch's mean loss."""
    device = next(model.parameters()).device
    model.train()
    torch.manual_seed(seed)
    losses = []
    for epoch in range(1, epochs + 1):
        loader.batch_sampler.set_epoch(epoch)
        desc = f"{name} epoch {epoch}/{epochs}"
        loss = run_epoch(
            model, loader, optimizer, scheduler, objective, device=device, desc=desc, progress=progress, on_step=on_step
        )
        losses.append(loss)
    model.eval()
    return losses


@torch.no_grad()
def validation_scores(model: LoraXSClassifier, examples: list[Example], encoder: Encoder, batch_size: int) -> dict:
    """Accuracy and NLL of the MAP on a split."""
    model.eval()
    device = next(model.parameters()).device
    correct, nll, count = 0, 0.0, 0
    for batch in make_loader(examples, encoder, batch_size, shuffle=False):
        logits = batch_logits(model, {k: v.to(device) for k, v in batch.items()}).float()
        labels = batch["labels"].to(device)
        correct += (logits.argmax(-1) == labels).sum().item()
        nll += F.cross_entropy(logits, labels, reduction="sum").item()
        count += len(labels)
    return {"accuracy": correct / count, "nll": nll / count}


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: copy.deepcopy(v.detach()) for k, v in model.named_parameters() if v.requires_grad}


def warmup_linear(total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor
