"""Latent attribute edits below the routes: which direction, which strengths, the edited latents, the answers.

An edit moves each input's posterior mean (or a given latent) along a direction and decodes every step:
``z' = mu + strength * vector``, strengths in raw latent units of the vector as stored or sent (strength 1
adds the whole vector; ``norm`` in ``GET /directions`` says how long that is). Directions are the artifact's
(``metadata.directions``, computed at training time or added with ``python -m training.directions add``) or
any vector of the latent size, such as one ``POST /directions/compute`` made from example images. The vector
math and the held-out AUROC are the contract's (``vae_artifact.directions``), the code training uses, so a
direction computed here from the images a stored one was built from is that direction.

Everything here is numpy on small arrays; encoding and decoding go through the batcher in the routes.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np

from service.core import codecs
from service.core.errors import InvalidInput, RequestTooLarge
from vae_artifact import directions as contract
from vae_artifact.directions import DirectionsSection

STRENGTHS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # the default strengths of an edit, in raw units of the vector
MAX_STRENGTHS = 16  # strengths per edit request; more get 413


class UnknownDirection(InvalidInput):
    code = "unknown_direction"


def listing(section: DirectionsSection, vectors: bool) -> Dict[str, List[dict]]:
    """``GET /directions``: every stored direction in its stored order, vectors only when asked for."""
    return {"directions": [d.to_dict(vector=vectors) for d in section]}


def strengths(values: Optional[Sequence[float]], default: Sequence[float]) -> np.ndarray:
    """The strengths of one edit as float64 (S,): ``default`` when none are given; more than MAX_STRENGTHS is
    RequestTooLarge (413), a non-finite one InvalidInput (422)."""
    array = np.asarray(default if not values else values, dtype=np.float64)
    if len(array) > MAX_STRENGTHS:
        raise RequestTooLarge(f"{len(array)} strengths in one edit; the limit is {MAX_STRENGTHS}")
    if not np.isfinite(array).all():
        raise InvalidInput("strengths must be finite numbers")
    return array


def vector(section: DirectionsSection, name: Optional[str], given: Optional[Sequence[float]],
           latent_dim: int) -> np.ndarray:
    """The edit's direction as float64 (D,): the stored one called ``name`` or the ``given`` vector, exactly
    one of them. An unknown name is UnknownDirection (422) listing the names on offer; a vector of the wrong
    length or with non-finite values is InvalidInput (422)."""
    if (name is None) == (given is None):
        raise InvalidInput("give exactly one of direction (a stored direction's name) or vector "
                           f"({latent_dim} numbers)")
    if name is not None:
        direction = section.items.get(name)
        if direction is None:
            raise UnknownDirection(f"unknown direction {name!r}; this model offers {section.names()}")
        return direction.array
    if len(given) != latent_dim:
        raise InvalidInput(f"vector has {len(given)} values; this model's latent size is {latent_dim}")
    array = np.asarray(given, dtype=np.float64)
    if not np.isfinite(array).all():
        raise InvalidInput("vector has values that are not finite")
    return array


def check_rows(inputs: int, steps: int, max_rows: int) -> None:
    """Every input decodes once per strength: the decoded images of one request count against ``max_rows``."""
    if inputs * steps > max_rows:
        raise RequestTooLarge(f"{inputs} inputs x {steps} strengths = {inputs * steps} images in one edit; the "
                              f"limit is {max_rows}")


def edited(mu: np.ndarray, direction: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """z' = mu + s * v: float32 (N, S, D); InvalidInput when a step leaves the float32 range."""
    z = contract.edit(mu, direction, steps)
    if not np.isfinite(z).all():
        raise InvalidInput("the edited latents leave the float32 range; use smaller strengths")
    return z


def edit_body(steps: np.ndarray, z: np.ndarray, pixels: np.ndarray) -> dict:
    """The JSON answer: per input its latents and base64 PNGs, one per strength. ``pixels`` (N, S, C, H, W)."""
    images = codecs.to_uint8(pixels)
    return {"strengths": steps.tolist(),
            "edits": [{"z": z[i].tolist(), "images": [codecs.encode_png_base64(image) for image in images[i]]}
                      for i in range(len(z))]}


def computed(mu_pos: np.ndarray, mu_neg: np.ndarray) -> dict:
    """``POST /directions/compute``: the direction from every example, its norm and counts, and its AUROC
    cross-fitted over seeded folds of the examples (the same every call)."""
    direction = contract.from_examples("computed", "custom", "", mu_pos, mu_neg)
    out = direction.to_dict()
    return {key: out[key] for key in ("vector", "norm", "n_pos", "n_neg", "auroc")}
