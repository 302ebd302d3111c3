"""Domain errors of the serving core. Core modules raise them and never build responses; the HTTP layer's
exception handlers (``service.api.errors``) give each its status and error body.

``InvalidInput`` and its subclasses are the client's fault (a 4xx, with ``code`` in the body); the others say
why the server cannot answer now (``ModelNotReady``) or what it does not serve (``UnknownModel``).
"""


class InvalidInput(ValueError):
    """Base for client-side input errors; ``code`` is a short machine-readable string."""

    code = "invalid_input"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"


class RequestTooLarge(InvalidInput):
    """Too many bytes, rows, samples or steps in one request."""

    code = "too_large"


class MalformedBody(InvalidInput):
    """The body's framing is broken (e.g. multipart without a boundary), before any content is looked at."""

    code = "bad_request"


class InvalidTensor(InvalidInput):
    """An Open Inference Protocol tensor that does not fit: datatype, shape, byte count, values, outputs."""

    code = "invalid_tensor"


class ModelNotReady(Exception):
    """The model is still loading or warming up, or the service is draining."""


class UnknownModel(LookupError):
    """An Open Inference Protocol model name (or version) this server does not serve."""


# A server process's exit status when the artifact or the settings cannot be served: the supervisor stops
# rather than start a replacement that would fail the same way.
REFUSED = 2
