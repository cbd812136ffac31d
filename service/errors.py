"""Errors the service answers with, each with its HTTP status, in one JSON shape:

``{"error": {"code": <status>, "type": <class name>, "message": <text>, "request_id": <id>}}``
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the API reports on purpose; ``status`` is the HTTP status code."""

    status = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequestError(ServiceError):
    status = 400


class UnauthorizedError(ServiceError):
    status = 401


class AdminDisabledError(ServiceError):
    status = 403


class AdapterNotFoundError(ServiceError):
    status = 404


class NotFoundError(ServiceError):
    status = 404


class ConflictError(ServiceError):
    status = 409


class GoneError(ServiceError):
    """What was asked for existed but is no longer held (an answer dropped from the feedback store)."""

    status = 410


class PayloadTooLargeError(ServiceError):
    status = 413


class BundleRejectedError(ServiceError):
    """A bundle that cannot be served: damaged, incomplete, or made for another base model."""

    status = 422


class InvalidLabelError(ServiceError):
    """A label the answer's adapter does not have."""

    status = 422


class RetryLaterError(ServiceError):
    """An error the client should retry: the answer says when (``Retry-After``, seconds)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class QueueFullError(RetryLaterError):
    status = 429


class ClientGoneError(ServiceError):
    """The client closed its connection while its request waited: nobody reads this answer (nginx's 499)."""

    status = 499


class NonFiniteOutputError(ServiceError):
    """The adapter produced probabilities that are not finite: the answer is withheld (a damaged adapter)."""

    status = 500


class NotReadyError(ServiceError):
    status = 503


class AdapterLoadingError(RetryLaterError):
    """The adapter is being loaded from the store (its first request took longer than the wait): retry."""

    status = 503


class StoreUnavailableError(RetryLaterError):
    """The bundle store cannot be reached."""

    status = 503


class FeedbackLogError(ServiceError):
    """The durable feedback log cannot be written: nothing of the batch was recorded."""

    status = 503


class PredictionTimeoutError(ServiceError):
    status = 504


def error_body(status: int, kind: str, message: str, request_id: str | None) -> dict:
    return {"error": {"code": status, "type": kind, "message": message, "request_id": request_id}}
