"""Typed errors of the adapters library.

Every way a bundle can be unusable has its own class, so callers (the server's registry, the trainer)
can react to the kind of problem and show a message that names it.
"""

from __future__ import annotations


class CaveatError(Exception):
    """Base class of every error raised on purpose by Caveat."""


class TargetNotFoundError(CaveatError, ValueError):
    """A target-module pattern matched no module (or matched a module that is not ``nn.Linear``)."""


class ProjectionSpecError(CaveatError, ValueError):
    """A projection spec such as ``dct-1/2_svd`` cannot be parsed or needs data it was not given."""


class BundleError(CaveatError):
    """A bundle cannot be loaded. Subclasses name the problem."""

    def __init__(self, path: object, message: str) -> None:
        self.path = str(path)
        self.reason = message  # without the path: what a server may tell its clients
        super().__init__(f"{message} (bundle: {self.path})")


class MissingFileError(BundleError):
    """A file the bundle needs (bundle.json or one listed under ``files``) does not exist."""


class ManifestError(BundleError):
    """bundle.json is not valid JSON or does not have the fields of the schema."""


class SchemaVersionError(BundleError):
    """bundle.json declares a schema version this library does not read."""


class ChecksumMismatchError(BundleError):
    """A tensor file's sha256 differs from the one recorded in bundle.json."""


class NotSafetensorsError(BundleError):
    """A tensor file is not in safetensors format (for instance a pickle); it is never unpickled."""


class ShapeMismatchError(BundleError):
    """Tensors disagree with the manifest, with each other, or with the base model's layers."""


class FingerprintMismatchError(BundleError):
    """The bundle was trained on another base model than the one it is being loaded onto."""


class InvalidValueError(BundleError):
    """A tensor or number is impossible: not finite, a negative variance, eigenvalue or precision, a threshold
    out of its range, or a posterior mean that differs from the MAP where the family says they are one."""


class UnsafePathError(BundleError):
    """A bundle file or directory is a link, or resolves, outside the directory it must stay inside."""


class OodFileError(BundleError):
    """The OOD score's tensor file is damaged: a tensor missing, of the wrong shape, or holding impossible
    values (wraps :class:`OodStateError`, naming the file)."""


class PosteriorValueError(CaveatError, ValueError):
    """A posterior family's tensors or parameters hold impossible values (see ``Posterior.validate``)."""


class OodError(CaveatError, ValueError):
    """An out-of-distribution score cannot be fitted or rebuilt. Subclasses name the problem."""


class OodFitError(OodError):
    """The training features cannot support the chosen score (too few examples, a class missing, ...)."""


class OodStateError(OodError):
    """A stored score is damaged: a tensor missing or of the wrong shape, not finite, a variance not positive."""
