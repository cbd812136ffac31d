"""``POST /v1/feedback``: true labels for served answers, joined by id (``service.feedback``)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import FeedbackAuth, State
from service.errors import PayloadTooLargeError
from service.schemas import FeedbackRequest, FeedbackResponse

router = APIRouter(tags=["feedback"])


@router.post("/v1/feedback", response_model=FeedbackResponse, dependencies=[FeedbackAuth])
async def feedback(body: FeedbackRequest, state: State) -> FeedbackResponse:
    """Join each label to its answer, append them to the durable log (fsync'd) and count them in the online
    metrics; the whole batch or nothing (404 unknown id, 410 no longer held, 409 labelled before, 422 a label
    the adapter does not have)."""
    limit = state.settings.max_feedback
    if len(body.feedback) > limit:
        raise PayloadTooLargeError(f"{len(body.feedback)} labels; this server takes at most {limit} per request")
    accepted = await state.feedback.record([(item.id, item.label) for item in body.feedback])
    return FeedbackResponse(accepted=accepted)
