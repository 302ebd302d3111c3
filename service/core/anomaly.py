"""The anomaly-score path below its two routes (/anomaly-score and the protocol's ``scorer``): the score
kernel on the batcher, the kind's compressed sizes computed beside it, then scoring's rows and summary. One
path, so both routes give the same numbers for the same images."""

import asyncio
from typing import Awaitable, List, Optional, Tuple

import numpy as np

from service.core import scoring
from service.core.batching import Batcher
from service.core.runtime import ScoreCall
from service.core.served import ServedModel


async def score_images(batcher: Batcher, model: ServedModel, images: np.ndarray, kind: scoring.ScoreKind, *,
                       k: int, alpha: float, tail: str, deadline: Optional[float],
                       abandoned: Optional[Awaitable]) -> Tuple[List[dict], dict]:
    """Per image, the /anomaly-score row of ``kind`` at ``k`` samples; and the calibration summary."""
    # A kind that tests latent statistics gets each row's from the same batch call as its score.
    params = ScoreCall(k, latent=kind.latent_needs) if kind.latent_needs else k
    scored = batcher.submit("score", images, params=params, deadline=deadline, abandoned=abandoned,
                            runner=model.runtime)
    if kind.compressor is None:
        out, bits = await scored, None
    else:  # compress on another thread while the model works
        out, bits = await asyncio.gather(scored, asyncio.to_thread(model.score_kinds.complexity_bits, kind, images))
    rows = await asyncio.to_thread(
        scoring.score_rows, out, num_dims=model.info.num_dims, calibration=kind.calibration,
        alpha=alpha, tail=tail, k=k, complexity_bits=bits, kind=kind,
    )
    return rows, scoring.calibration_summary(kind.calibration, alpha, tail, k)
