"""Request and response bodies (JSON). They define /openapi.json; routes return these shapes."""

from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

# Non-finite numbers are refused at parse time (422), so NaN never reaches the model.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

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
    z: List[Vector] = Field(min_length=1, description="Latent vectors, each of the model's latent size.")


class SampleIn(BaseModel):
    model_config = _STRICT
    n: int = Field(1, ge=1, description="Number of samples (at most the server's max_n).")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="Same seed, same images and z.")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Scale of the prior's standard deviation.")


class InterpolateIn(BaseModel):
    model_config = _STRICT
    z: Optional[List[Vector]] = Field(None, min_length=2, max_length=2, description="Two end latents.")
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
                                                         "nll-minus-<compressor> kinds (score = nll - ln 2 * this).")
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


class Status(BaseModel):
    status: str
