"""/anomaly-score: importance-weighted NLL per image, calibrated into conformal p-values."""

from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Depends, Query, Request
from service.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service import scoring
from service.deps import Deadline, Ready, client_gone, require_api_key
from service.errors import RequestTooLarge
from service.inputs import IMAGE_BODY, read_images
from service.routes.inference import ERRORS
from service.schemas import AnomalyOut

router = APIRouter(tags=["anomaly"], dependencies=[Depends(require_api_key)], responses=ERRORS)


@router.post("/anomaly-score", response_model=AnomalyOut, openapi_extra=IMAGE_BODY)
async def anomaly_score(
    request: Request, state: Ready, deadline: Deadline,
    k: Annotated[Optional[int], Query(ge=1, description="Importance samples; default: the calibration's K.")] = None,
    alpha: Annotated[float, Query(gt=0.0, lt=1.0, description="Level: is_anomaly when p_value <= alpha.")] = 0.01,
    tail: Annotated[Literal["upper", "two-sided"], Query(description="two-sided also flags too-likely inputs.")] = "upper",
    score: Annotated[Literal["nll"], Query(description="Score kind.")] = "nll",
) -> JSONResponse:
    """Images -> per image: NLL (nats, bits/dim) with its SE and ESS, ELBO terms, p-value, is_anomaly."""
    k = state.runtime.info.score_k if k is None else k
    if k > state.settings.max_k:
        raise RequestTooLarge(f"k={k} is over the limit of {state.settings.max_k}")
    images = await read_images(request, state.image_spec, state.settings.max_rows)
    out = await state.batcher.submit("score", images, params=k, deadline=deadline, abandoned=client_gone(request))
    rows = await run_in_threadpool(
        scoring.score_rows, out, num_dims=state.runtime.info.num_dims, calibration=state.calibration,
        alpha=alpha, tail=tail, k=k,
    )
    summary = scoring.calibration_summary(state.calibration, alpha, tail, k)
    return JSONResponse({"score": score, "k": k, "scores": rows, "calibration": summary})
