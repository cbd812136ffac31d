"""``POST /v1/predict``: the predictive distribution and its uncertainty for each input."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.deps import State, client_gone
from service.predict import results_of, run_prediction
from service.schemas import AdapterRef, PredictRequest, PredictResponse, Timing

router = APIRouter(tags=["predict"])


@router.post("/v1/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, request: Request, state: State) -> PredictResponse:
    request.state.adapter = body.adapter.partition("@")[0]
    answer = await run_prediction(
        state, body.adapter, body.inputs, num_samples=body.num_samples, method=body.method, seed=body.seed,
        abstain=body.abstain, disconnected=client_gone(request),
    )  # fmt: skip
    adapter, result = answer.adapter, answer.result
    return PredictResponse(
        request_id=request.state.request_id,
        adapter=AdapterRef(name=adapter.name, version=adapter.version, sha256=adapter.sha256),
        labels=adapter.labels,
        method=answer.method,
        num_samples=answer.num_samples,
        seed=answer.seed,
        results=results_of(answer, body.return_samples),
        timing=Timing(
            queue_ms=result.queue_seconds * 1000,
            compute_ms=result.compute_seconds * 1000,
            total_ms=answer.total_seconds * 1000,
            batch_requests=result.batch_requests,
            batch_rows=result.batch_rows,
        ),
    )
