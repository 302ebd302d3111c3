"""/anomaly-score: per image, a score of the requested kind calibrated into a conformal p-value, plus the
importance-weighted NLL with its SE and ESS and the ELBO terms."""

from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Query, Request

from service.api.deps import CALL_HEADERS, Model, client_gone
from service.api.inputs import IMAGE_BODY, read_images
from service.api.responses import JSONResponse
from service.api.routes.inference import ERRORS
from service.api.routing import ModelRoute
from service.api.schemas import AnomalyOut
from service.core.anomaly import score_images
from service.core.errors import RequestTooLarge

router = APIRouter(tags=["anomaly"], responses=ERRORS, route_class=ModelRoute)


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
    model = call.model
    kind = model.score_kinds.get(score)  # 422 naming the kinds on offer
    k = model.info.score_k if k is None else k
    if k > call.settings.max_k:
        raise RequestTooLarge(f"k={k} is over the limit of {call.settings.max_k}")
    images = await read_images(request, model.image_spec, call.settings)
    rows, summary = await score_images(call.state.batcher, model, images, kind, k=k, alpha=alpha, tail=tail,
                                       deadline=call.deadline, abandoned=client_gone(request))
    return JSONResponse({"score": kind.name, "k": k, "scores": rows, "calibration": summary})
