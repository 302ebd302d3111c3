"""The model a request is answered by: the loaded artifact and what the service derives from its metadata once.

A request reads the served model once, at its start, and uses that one object to the end (its image shape to
decode uploads, its score kinds and calibration, its runtime for every batch), so it is answered wholly by one
model.
"""

from dataclasses import dataclass

from service.core.codecs import ImageSpec
from service.core.runtime import ModelInfo, ModelRuntime
from service.core.scoring import ScoreKinds


@dataclass(frozen=True)
class ServedModel:
    runtime: ModelRuntime
    score_kinds: ScoreKinds  # the artifact's anomaly score kinds, built once from its metadata
    image_spec: ImageSpec  # what uploads are decoded to: the model's channels and size

    @classmethod
    def of(cls, runtime: ModelRuntime, *, max_pixels: int) -> "ServedModel":
        """``runtime``'s artifact as served, uploads limited to ``max_pixels`` source pixels per image."""
        info = runtime.info
        return cls(runtime, ScoreKinds.from_metadata(runtime.metadata, latent=runtime.latent_outputs),
                   ImageSpec(info.channels, info.height, info.width, max_pixels=max_pixels))

    @property
    def info(self) -> ModelInfo:
        return self.runtime.info
