"""The JSON response class: orjson, strict (NaN/inf never appear as bare tokens), numpy-aware."""

from typing import Any

import orjson
from starlette.responses import Response


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        # orjson writes non-finite floats as null, so every body is valid JSON for strict parsers.
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
