"""The names the trainer, the bundle and the server share, each spelled once (``bundle.json`` stores the values).

Flags, manifest fields, request fields and registries take their choices from these enums, so a name added here
is accepted everywhere it applies and a name that is not here is refused everywhere alike.
"""

from __future__ import annotations

from enum import StrEnum


class PredictiveMode(StrEnum):
    """How a prediction is computed from a bundle (``adapters.predictives``; ``method`` of a request)."""

    SAMPLE = "sample"  # posterior samples of the cores through the network
    GLM = "glm"  # the linearised network: Gaussian logits, drawn in logit space (Laplace and other Gaussians)
    MAP = "map"  # the trained cores alone


class PosteriorFamily(StrEnum):
    """The posterior families a bundle can hold (``adapters.posteriors``; ``family`` in ``bundle.json``)."""

    MAP = "map"
    DIAG = "diag"
    FULL = "full"
    KRON = "kron"
    LOWRANK_DIAG = "lowrank_diag"
    ENSEMBLE = "ensemble"
    DROPOUT = "dropout"
    MATRIX_NORMAL = "matrix_normal"  # Bayesian-LoRA on the cores


class OodMethod(StrEnum):
    """Feature-space OOD scores (``adapters.ood``; ``ood.method`` in ``bundle.json``, ``--ood-method``)."""

    MAHALANOBIS = "mahalanobis"  # class-conditional Gaussians, tied covariance: min over classes
    RELATIVE_MAHALANOBIS = "relative-mahalanobis"  # minus the distance under one background Gaussian
    KNN = "knn"  # distance to the k-th nearest training feature


class AbstentionKind(StrEnum):
    """The scores an abstention rule thresholds (``adapters.predictive.AbstentionRule``)."""

    MAX_PROB = "max_prob"  # the top probability: abstain below
    ENTROPY = "entropy"  # normalised entropy in [0, 1]: abstain above
    MUTUAL_INFORMATION = "mutual_information"  # nats: abstain above
    OOD = "ood"  # the OOD p-value: abstain below (never fires for a bundle without a score)
    AMBIGUOUS = "ambiguous"  # the conformal set's size: abstain above (an empty set counts as every label)


class Pooling(StrEnum):
    """How a classifier head reads the token states (``adapters.pooling``)."""

    MEAN = "mean"  # the average of non-padding tokens (encoders)
    CLS = "cls"  # the first token
    LAST = "last"  # the last non-padding token (decoders, right padding)
    POOLER = "pooler"  # the first token through a frozen dense layer and tanh (BERT's and RoBERTa's own heads)


class TaskType(StrEnum):
    """What a bundle predicts (``task.type`` in ``bundle.json``)."""

    SEQUENCE_CLASSIFICATION = "sequence-classification"
    MULTIPLE_CHOICE = "multiple-choice"


class ChoiceScoring(StrEnum):
    """How a causal LM scores a multiple-choice item's choices (``adapters.cloze``, ``adapters.tasks``)."""

    CLOZE = "cloze"  # each choice's text after the question: its length-normalised log-likelihood
    LETTER = "letter"  # all choices in one prompt, lettered: the answer letters' next-token logits


class ClozeNormalisation(StrEnum):
    """What a cloze score's log-likelihood is divided by (``adapters.cloze``)."""

    TOKENS = "tokens"  # the choice's token count: the mean log-likelihood per token
    CHARS = "chars"  # the choice's character count (lm-eval's acc_norm)
    NONE = "none"  # the summed log-likelihood: favours short choices


class ConformalScore(StrEnum):
    """How a label's nonconformity is scored for conformal prediction sets (``adapters.conformal``)."""

    LAC = "lac"  # 1 − p_y: the smallest sets on average
    APS = "aps"  # the probability mass of the labels ranked at or above y: sets that adapt to the input
