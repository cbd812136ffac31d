"""A JSON response encoded by orjson: the hot routes build plain dicts and lists (no model to validate again)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    """``application/json`` from plain values; non-finite floats become ``null`` (as pydantic writes them)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
