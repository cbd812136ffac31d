"""``POST /v1/predict``: the predictive distribution and its uncertainty for each input."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.deps import State, client_gone
from service.predict import response_body, run_prediction
from service.responses import FastJSONResponse
from service.schemas import PredictRequest, PredictResponse

router = APIRouter(tags=["predict"])


@router.post("/v1/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, request: Request, state: State) -> FastJSONResponse:
    """The body's shape is :class:`PredictResponse` (documented and tested); it is built from host lists and
    encoded directly, without a second validation."""
    request.state.adapter = body.adapter.partition("@")[0]
    answer = await run_prediction(
        state, body.adapter, body.inputs, num_samples=body.num_samples, method=body.method, seed=body.seed,
        abstain=body.abstain, coverage=body.coverage, disconnected=client_gone(request),
    )  # fmt: skip
    return FastJSONResponse(response_body(answer, request.state.request_id, body.return_samples))
