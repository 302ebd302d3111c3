"""/anomaly-score: per image, a score of the requested kind calibrated into a conformal p-value, plus the
importance-weighted NLL with its SE and ESS and the ELBO terms."""

from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Query, Request

from service.anomaly import score_images
from service.deps import CALL_HEADERS, Model, client_gone
from service.errors import RequestTooLarge
from service.inputs import IMAGE_BODY, read_images
from service.routes.inference import ERRORS
from service.responses import JSONResponse
from service.schemas import AnomalyOut

router = APIRouter(tags=["anomaly"], responses=ERRORS)


@router.post("/anomaly-score", response_model=AnomalyOut, openapi_extra=IMAGE_BODY | CALL_HEADERS)
async def anomaly_score(
    request: Request, call: Model,
    k: Annotated[Optional[int], Query(ge=1, description="Importance samples; default: the calibration's K. "
                                                        "Another K gets no p-values (calibrated: false).")] = None,
    alpha: Annotated[float, Query(gt=0.0, lt=1.0, description="Level: is_anomaly when p_value <= alpha.")] = 0.01,
    tail: Annotated[Literal["upper", "two-sided"], Query(description="two-sided also flags too-likely inputs.")] = "upper",
    score: Annotated[Optional[str], Query(description="Score kind: nll, nll-minus-<compressor> (NLL corrected by "
                                                      "input complexity), or fisher-<compressor> (that, combined "
                                                      "with a typicality test on the compressed size); default: "
                                                      "the artifact's scoring.default. "
                                                      "/v1/model lists the kinds (metadata.scoring.kinds).")] = None,
) -> JSONResponse:
    """Images -> per image: the score and its p-value / is_anomaly, NLL (nats, bits/dim) with SE and ESS, ELBO terms."""
    state, deadline, kinds = call.state, call.deadline, call.state.score_kinds
    kind = kinds.get(score)  # 422 naming the kinds on offer
    k = state.runtime.info.score_k if k is None else k
    if k > state.settings.max_k:
        raise RequestTooLarge(f"k={k} is over the limit of {state.settings.max_k}")
    images = await read_images(request, state.image_spec, state.settings.max_rows)
    rows, summary = await score_images(state, images, kind, k=k, alpha=alpha, tail=tail, deadline=deadline,
                                       abandoned=client_gone(request))
    return JSONResponse({"score": kind.name, "k": k, "scores": rows, "calibration": summary})
