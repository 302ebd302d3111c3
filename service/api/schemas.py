"""Request and response bodies (JSON). They define /openapi.json; routes return these shapes."""

from typing import Annotated, Any, Dict, List, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict

from service.core.editing import MAX_STRENGTHS, STRENGTHS

# Non-finite numbers are refused at parse time (422), so NaN never reaches the model.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _json_integer(value: Any) -> Any:
    if isinstance(value, (bool, str)):  # bool first among ints: True is an int in Python
        raise ValueError("must be a JSON integer")
    return value


# Numbers as the schema says them: pydantic's lax mode would also take true as 1 and "3" as 3. Floats are strict
# (which still takes 3 for 3.0); integers are checked by hand, since a strict int refuses 3.0, which JSON Schema
# calls an integer. (Constraints go before the validator: after it, they would not reach the schema.)
Integer = BeforeValidator(_json_integer)

FLOAT32_MAX = 3.4028234663852886e38  # np.finfo(np.float32).max
# A latent coordinate sent to the model: finite in float32, its dtype (a larger JSON number would become inf).
# How many per vector depends on the loaded model: service.api.openapi states it in the served document.
LatentIn = List[Annotated[float, Strict(), Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]]
# An interpolation end: slerp scales a coordinate by at most 1 / cos(omega / 2) <= 2e6 (latent.interpolate
# follows the great circle only up to pi - 1e-6), so from ends within 1e30 every frame is finite in float32.
END_MAX = 1e30
EndLatentIn = List[Annotated[float, Strict(), Field(ge=-END_MAX, le=END_MAX)]]
Vector = List[float]


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable reason, e.g. invalid_image, queue_full.")
    message: str
    error_id: Optional[str] = Field(None, description="For 5xx: the id logged beside the cause.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImagesIn(BaseModel):
    model_config = _STRICT
    images: List[str] = Field(min_length=1, description="Base64 images (PNG, JPEG, ...) or data: URLs.")


class LatentsIn(BaseModel):
    model_config = _STRICT
    z: List[LatentIn] = Field(min_length=1, description="Latent vectors, each of the model's latent size.")


class SampleIn(BaseModel):
    model_config = _STRICT
    n: Annotated[int, Integer] = Field(1, ge=1, description="Number of samples (at most the server's max_n).")
    seed: Optional[Annotated[int, Field(ge=0, le=2**63 - 1), Integer]] = Field(
        None, description="Same seed, same images and z.")
    temperature: Annotated[float, Strict()] = Field(1.0, gt=0.0, le=10.0,
                                                    description="Scale of the prior's standard deviation.")


class InterpolateIn(BaseModel):
    # Exactly one of the two (the route checks it): the schema says so too.
    model_config = ConfigDict(**_STRICT, json_schema_extra={"oneOf": [
        {"required": [name], "properties": {name: {"type": "array"}}} for name in ("z", "images")]})
    z: Optional[List[EndLatentIn]] = Field(None, min_length=2, max_length=2, description="Two end latents.")
    images: Optional[List[str]] = Field(None, min_length=2, max_length=2, description="Two base64 end images.")


class EncodeOut(BaseModel):
    mu: List[Vector]
    logvar: List[Vector]
    z: Optional[List[Vector]] = Field(None, description="mu + exp(logvar / 2) * eps, when sample=true.")
    seed: Optional[int] = None


class ImagesOut(BaseModel):
    images: List[str] = Field(description="Base64 PNGs, 8-bit, in the model's mode and size.")
    z: List[Vector] = Field(description="The latent each image was decoded from.")
    seed: Optional[int] = None


class AnomalyRow(BaseModel):
    score_nats: float = Field(description="The requested score kind (higher = stranger); p_value, percentile and "
                                          "is_anomaly are about this number.")
    complexity_bits: Optional[float] = Field(description="Compressed size of the input in bits, for the "
                                                         "nll-minus-<compressor> kinds (score = nll - ln 2 * this) "
                                                         "and the combined kinds (fisher-<compressor>, "
                                                         "density-<compressor>: terms of theirs).")
    neighbour_distance: Optional[float] = Field(
        default=None, description="For the fisher-<compressor>-nn kinds (one of their terms): Euclidean distance from "
                                  "the input's posterior mean to the nearest posterior mean of the artifact's latent "
                                  "bank of training images; null for the other kinds.")
    latent_density_nats: Optional[float] = Field(
        default=None, description="For the density-<compressor> kinds (their main term): -log of the density of the "
                                  "input's latent features (posterior mean, mean posterior log-variance) under the "
                                  "artifact's mixture fitted to the training images, nats; null for the other kinds.")
    nll_nats: float = Field(description="Importance-weighted negative log-likelihood (the 'nll' score kind).")
    nll_bits_per_dim: float
    nll_se_nats: Optional[float] = Field(description="Monte Carlo standard error of nll_nats (delta method).")
    ess: float = Field(description="Effective sample size of the K importance weights.")
    elbo_nats: float
    reconstruction_nats: float
    kl_nats: float
    p_value: Optional[float] = Field(description="Conformal p-value against the artifact's calibration scores; null "
                                                 "when uncalibrated (see calibration.calibrated).")
    percentile: Optional[float] = Field(description="Share of calibration scores below score_nats, in percent; null "
                                                    "when uncalibrated.")
    is_anomaly: Optional[bool] = Field(description="p_value <= alpha; null when uncalibrated.")


class CalibrationOut(BaseModel):
    calibrated: bool = Field(description="False when the artifact has no calibration of this score kind, or the "
                                         "request's k differs from the calibration's K (scores at another K are "
                                         "not comparable: p_value, percentile, is_anomaly and thresholds are null).")
    n: int = Field(description="Calibration scores (held-out normal images); 0 without calibration.")
    k: Optional[int] = Field(description="The calibration's K: the only k that gets p-values.")
    alpha: float
    tail: Literal["upper", "two-sided"]
    threshold_nats: Optional[float] = Field(description="is_anomaly when score_nats > this (two-sided: at alpha / 2).")
    threshold_low_nats: Optional[float] = Field(None, description="Two-sided only: also is_anomaly when score_nats "
                                                                  "< this (an atypically likely input).")


class AnomalyOut(BaseModel):
    score: str = Field(description="The score kind, one of the artifact's scoring.kinds (see /v1/model).")
    k: int
    scores: List[AnomalyRow]
    calibration: CalibrationOut


class ModelOut(BaseModel):
    device: str
    sha256: str
    image: Dict[str, int]
    latent_dim: int
    score_k: int
    metadata: Dict[str, Any] = Field(description="The artifact's metadata.json, calibration scores left out.")


class ReloadIn(BaseModel):
    model_config = _STRICT
    path: Optional[str] = Field(None, max_length=4096, description=(
        "The artifact to serve, inside the model directory (VAE_MODEL_DIR; a relative path is taken inside it). "
        "Without it: the configured model path again, e.g. after the file there was replaced."))


class ReloadOut(BaseModel):
    sha256: str = Field(description="The artifact every server process serves now.")
    previous_sha256: str = Field(description="The one the process that took the request served before.")
    processes: int = Field(description="Server processes serving sha256 (all of them).")


class Status(BaseModel):
    status: str


# -- latent editing (service.core.editing) ---------------------------------------------------------------------
Strength = Annotated[float, Strict(), Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


class DirectionOut(BaseModel):
    name: str = Field(description="class:<label>, pixel:<statistic>, or a custom name.")
    kind: Literal["class", "pixel", "custom"]
    description: str
    n_pos: int = Field(description="Images with the attribute the vector was built from.")
    n_neg: int = Field(description="Images without it.")
    norm: float = Field(description="Euclidean length of the vector, in latent units.")
    auroc: Optional[float] = Field(description="Held-out AUROC of the projection <mu, vector> separating images "
                                               "with the attribute from images without; null when unchecked.")
    vector: Optional[Vector] = Field(None, description="Only with ?vectors=true.")


class DirectionsOut(BaseModel):
    directions: List[DirectionOut]


class EditIn(BaseModel):
    # Exactly one input (images or z) and exactly one direction (a name or a vector): the route checks it.
    model_config = _STRICT
    images: Optional[List[str]] = Field(None, min_length=1, description="Base64 images, edited from their "
                                                                        "posterior means.")
    z: Optional[List[LatentIn]] = Field(None, min_length=1, description="Latent vectors to edit.")
    direction: Optional[str] = Field(None, description="A stored direction's name (GET /directions).")
    vector: Optional[LatentIn] = Field(None, description="A direction of the model's latent size, e.g. from "
                                                         "POST /directions/compute.")
    strengths: List[Strength] = Field(list(STRENGTHS), min_length=1, description=(
        f"z' = mu + strength * vector, in raw units of the vector (1 adds it once); at most {MAX_STRENGTHS}."))


class EditRow(BaseModel):
    z: List[Vector] = Field(description="The edited latent per strength.")
    images: List[str] = Field(description="Base64 PNG per strength.")


class EditOut(BaseModel):
    strengths: List[float]
    edits: List[EditRow] = Field(description="One per input, in order.")


class ExamplesIn(BaseModel):
    model_config = _STRICT
    positive: List[str] = Field(min_length=1, description="Base64 images with the attribute.")
    negative: List[str] = Field(min_length=1, description="Base64 images without it.")


class ComputedDirectionOut(BaseModel):
    vector: Vector = Field(description="mean(mu of positives) - mean(mu of negatives); send it to /edit.")
    norm: float
    n_pos: int
    n_neg: int
    auroc: Optional[float] = Field(description="AUROC of <mu, v> on held-out examples (4 seeded folds, each "
                                               "projected on the direction of the others); null with fewer than "
                                               "2 examples on a side.")
