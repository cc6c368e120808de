"""JSON in and out of the server: request bodies read within a size limit, and the responses written.

Every failure a client causes is raised as RequestFailed and answered with its status and {"error": "..."}.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response


class RequestFailed(Exception):
    """Answered as {"error": message} with this status; raised for whatever a request got wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class CompactJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        # NaN and infinities from a model are written as Python's json writes them (NaN, Infinity):
        # strict JSON cannot express them, and refusing to answer would be worse.
        return json.dumps(content, separators=(",", ":"), allow_nan=True).encode("utf-8")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return CompactJSONResponse({"error": message}, status_code=status, headers=headers)


async def read_json(request: Request, limit: int) -> Any:
    """The request's body parsed as JSON; a body over `limit` bytes is refused before it is all read."""
    too_large = RequestFailed(413, f"the body is larger than the server's limit of {limit} bytes; send fewer rows per request")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestFailed(400, "the client closed the connection before the body was complete") from None
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as error:
        raise RequestFailed(400, f'the body is not valid JSON ({error}); send e.g. {{"data": [[0.5, 1.0]]}}') from None
