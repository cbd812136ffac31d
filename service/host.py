"""The frozen base model, loaded once per process, with a host LoRA-XS layer on every linear map.

Host layers (injected without projections) are the plain base layers except inside a batched-rows forward,
where each adapter's rows get their own cores. Per-layer digests of the float32 weights are taken before
the base is cast, so any bundle can be checked against the running base (``fingerprint``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AutoTokenizer

from adapters import cloze
from adapters.architectures import default_pooling
from adapters.base_model import load_base
from adapters.batching import RowBlock
from adapters.defaults import DEFAULT_CLOZE_NORMALISATION, resolve_token_budget
from adapters.fingerprint import combine_digests, module_digests
from adapters.injection import inject_lora_xs, lora_xs_layers
from adapters.model import LoraXSClassifier
from adapters.ood.features import BaseFeatureTap
from adapters.pooling import DenseTanhPooler
from adapters.predictives import Predictor, RowOutput

log = logging.getLogger("caveat.serve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STEP_TOKENS = {"cpu": 1024, "cuda": 262_144}  # rows × tokens between scheduling decisions; calibration only raises it
STEP_MS = {"cpu": 250.0, "cuda": 50.0}  # how long a calibrated step should take (service.engine)
MAX_STEP_TOKENS = 262_144
CALIBRATION_ROWS, CALIBRATION_TOKENS = (1, 8), 32  # the two timed forwards: rows of 32-token inputs
MIN_CALIBRATION_TOKENS = 4  # a forward of one such row costs what any forward costs


@dataclass(frozen=True)
class Calibration:
    """What :meth:`ModelHost.calibrate` measured.

    Attributes:
        step_tokens: rows × tokens of an engine step.
        seconds_per_token: the marginal cost of one row's token.
        seconds_per_forward: the fixed cost of a forward, whatever its size.
    """

    step_tokens: int
    seconds_per_token: float
    seconds_per_forward: float

    @property
    def split_padding(self) -> int:
        """Rows × tokens of padding that cost as much as one more forward."""
        return int(self.seconds_per_forward / self.seconds_per_token)


@dataclass(frozen=True)
class TextInput:
    """One input as the model sees it: a text, an optional second text, and the adapter's max length.

    A multiple-choice input is its formatted prompt with ``num_choices`` set; it is truncated from the left,
    so the ``Answer:`` at its end survives. A cloze one also carries its ``choices``, packed after the prompt
    (:mod:`adapters.cloze`), their ``normalisation`` and the adapter's ``max_choices``.
    """

    text: str
    text_pair: str | None
    max_length: int
    num_choices: int | None = None
    choices: tuple[str, ...] | None = None
    normalisation: str = DEFAULT_CLOZE_NORMALISATION
    max_choices: int | None = None

    def pack(self, tokenizer) -> dict[str, list]:
        """A cloze input's packed tokens (:func:`adapters.cloze.pack`)."""
        return cloze.pack(tokenizer, self.text, self.choices, self.max_length, self.normalisation, self.max_choices)


class ModelHost:
    """Tokenizer and base model on one device, ready for batched-rows forwards.

    Attributes:
        name: the base model as given (``minilm``, a hub id or a path).
        device, dtype: where and in which precision the base runs.
        pooling: how token states become features (``mean`` for encoders, ``last`` for decoders).
        hidden_size: the feature size an adapter head must take.
        num_layers: transformer blocks of the base (the OOD features read some of them).
        layer_shapes: adapted-module name → ``(d_out, d_in)``.
        split_padding: rows × tokens of padding that cost as much as one more forward (``None``: not
            measured; forwards then join inputs of any lengths up to the token budget).
        load_seconds: time to load, fingerprint, cast and move the base.
    """

    def __init__(self, name: str, device: str = "auto", dtype: str = "float32", token_budget: int | None = None):
        start = time.perf_counter()
        self.name = name
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        loaded = load_base(name)  # as the trainer loads it: the same float32 weights and tokenizer
        self.tokenizer, base = loaded.tokenizer, loaded.model
        embeddings = loaded.output_embeddings
        # a decoder's LM head, which cloze adapters read (a copy in the host's dtype, on its device)
        self.output_embeddings = None if embeddings is None else embeddings.to(device=self.device, dtype=self.dtype)
        self._counter = AutoTokenizer.from_pretrained(loaded.path)  # counts tokens at admission, beside the worker's
        self._counter.model_max_length = 1 << 30  # counts are capped per adapter, not warned about
        self._digests = module_digests(base)  # float32, before any cast
        inject_lora_xs(base, list(self._digests))
        base.to(device=self.device, dtype=self.dtype).eval()
        self.pooling = default_pooling(base.config)
        self.classifier = LoraXSClassifier(base, num_labels=None, pooling=self.pooling).eval()
        self.hidden_size = base.config.hidden_size
        self.num_layers = base.config.num_hidden_layers
        self.layer_shapes = {
            n: (layer.base.out_features, layer.base.in_features) for n, layer in lora_xs_layers(base).items()
        }
        self.token_budget = resolve_token_budget(self.device, token_budget)
        self.split_padding: int | None = None  # measured by calibrate(); until then forwards pad freely
        self.load_seconds = time.perf_counter() - start

    @property
    def default_step_tokens(self) -> int:
        return STEP_TOKENS.get(self.device.type, STEP_TOKENS["cuda"])

    @property
    def default_step_ms(self) -> float:
        return STEP_MS.get(self.device.type, STEP_MS["cuda"])

    @torch.inference_mode()
    def calibrate(self, step_ms: float, repeats: int = 3) -> Calibration:
        """Time this base and size the engine's step and the forwards' padding from it; sets :attr:`split_padding`.

        Two timed base forwards (1 and 8 rows of 32-token inputs, the fastest of ``repeats`` each) give the
        marginal cost of a token (their difference over their difference in tokens); a third, of one 4-token
        row, gives the fixed cost of a forward (Python, kernel launches). The step holds what the base runs
        in about ``step_ms`` at the marginal cost, so on a tiny model a step holds many requests, on a big one
        few; the adapters' per-row work is not in it (``max_batch_rows`` caps a step's rows as well). The step
        is never below the device's :data:`STEP_TOKENS` (the step measured against one costly request among
        small ones, docs/benchmarks.md: calibration only lets cheap tokens batch more) nor above
        :data:`MAX_STEP_TOKENS`. The padding worth a second forward is the fixed cost over the marginal one.
        """
        timings = [self._fastest_forward(rows, CALIBRATION_TOKENS, repeats) for rows in CALIBRATION_ROWS]
        tokens = [rows * CALIBRATION_TOKENS for rows in CALIBRATION_ROWS]
        per_token = max(timings[1] - timings[0], 1e-9) / (tokens[1] - tokens[0])
        per_forward = self._fastest_forward(1, MIN_CALIBRATION_TOKENS, repeats)  # all but free of tokens
        step = min(max(int(step_ms / 1000 / per_token), self.default_step_tokens), MAX_STEP_TOKENS)
        calibration = Calibration(step, per_token, per_forward)
        self.split_padding = calibration.split_padding
        return calibration

    def _fastest_forward(self, rows: int, tokens: int, repeats: int) -> float:
        """Seconds of the fastest of ``repeats`` base forwards of ``rows`` inputs of exactly ``tokens`` tokens."""
        text = " ".join(["caveat"] * 4 * tokens)  # truncated to exactly ``tokens``
        batch = self.encode([TextInput(text, None, tokens)] * rows)
        self.classifier.features(batch)  # first call of this shape: allocator, kernels
        return min(self._timed_features(batch) for _ in range(repeats))  # the least disturbed

    def _timed_features(self, batch: dict[str, Tensor]) -> float:
        start = time.perf_counter()
        self.classifier.features(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def pooler(self, module: str) -> DenseTanhPooler | None:
        """The base's own pooler layer ``module`` (BERT's ``pooler.dense``) as a head's readout; ``None`` when the
        base has no such layer."""
        return DenseTanhPooler.of_base(self.classifier.base, module)

    def fingerprint(self, modules: Sequence[str]) -> str | None:
        """The base fingerprint over ``modules`` (as bundles record it); ``None`` if a module is unknown."""
        if any(m not in self._digests for m in modules):
            return None
        return combine_digests(self._digests, modules)

    def token_counts(self, inputs: Sequence[TextInput]) -> list[int]:
        """Tokens of each input after truncation at its max length (thread-safe: never truncates or pads, so
        the counting tokenizer's settings never change)."""
        plain = [item for item in inputs if item.choices is None]  # packed (cloze) inputs count by packing
        texts = [item.text for item in plain]
        pairs = [item.text_pair or "" for item in plain] if any(item.text_pair for item in plain) else None
        counted = iter(self._counter(texts, pairs)["input_ids"] if plain else [])
        return [
            self._packed_length(index, item) if item.choices is not None else min(len(next(counted)), item.max_length)
            for index, item in enumerate(inputs)
        ]

    def _packed_length(self, index: int, item: TextInput) -> int:
        try:
            return len(item.pack(self._counter)["input_ids"])
        except cloze.ClozeInputError as exc:
            raise cloze.ClozeInputError(f"inputs[{index}]: {exc}") from None

    def encode(self, inputs: Sequence[TextInput]) -> dict[str, Tensor]:
        """Tokenise unique inputs, each truncated at its own max length, into one right-padded batch."""
        groups: dict[tuple[int, bool, bool], list[int]] = {}
        encoded: list[dict[str, list]] = [{}] * len(inputs)
        for index, item in enumerate(inputs):
            if item.choices is not None:
                encoded[index] = item.pack(self.tokenizer)
                continue
            key = (item.max_length, item.text_pair is not None, item.num_choices is not None)
            groups.setdefault(key, []).append(index)
        for (max_length, paired, prompt), indices in groups.items():
            texts = [inputs[i].text for i in indices]
            pairs = [inputs[i].text_pair for i in indices] if paired else None
            self.tokenizer.truncation_side = "left" if prompt else "right"  # only the worker thread encodes
            batch = self.tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True)
            for row, index in enumerate(indices):
                encoded[index] = {k: batch[k][row] for k in batch}
        unpadded = [{k: row[k][: sum(row["attention_mask"])] for k in row} for row in encoded]
        return {k: v.to(self.device) for k, v in cloze.pad(unpadded, self.tokenizer.pad_token_id).items()}

    def run(
        self,
        predictor: Predictor,
        batch: dict[str, Tensor],
        blocks: Sequence[RowBlock],
        tap: BaseFeatureTap | None = None,
    ) -> list[RowOutput]:
        """``predictor``'s batched-rows forward of ``blocks`` (packed by length under the CPU token budget, split
        where padding costs more than a forward): logits ``(S_b, n_b, C_b)`` per block, with Jacobians for a
        linearised mode. ``tap``: inputs whose frozen-base OOD features to collect, one extra row each."""
        return predictor.forward(
            self.classifier, batch, blocks, token_budget=self.token_budget, tap=tap, split_padding=self.split_padding
        )

    def feature_tap(self, layers: Sequence[int], wanted: Sequence[int]) -> BaseFeatureTap:
        """A tap collecting the OOD features of unique inputs ``wanted`` from ``layers``, pooled as the base pools."""
        return BaseFeatureTap(layers, self.pooling, wanted)

    @torch.inference_mode()
    def warm_up(self) -> float:
        """A forward through the base (kernels, allocator, tokenizer); returns its seconds."""
        start = time.perf_counter()
        batch = self.encode([TextInput("Caveat warm-up input.", None, 32)] * 2)
        self.classifier.features(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved
