"""A request-body size limit enforced before the body is read, for every endpoint.

Reading first and checking afterwards lets one unauthenticated request fill the process's memory
(``POST /oauth/token`` with 400 MB took the API from 88 MB to 668 MB). This ASGI middleware
refuses a declared ``Content-Length`` above the limit without reading anything, and counts the
bytes of a body streamed without one (chunked), failing the request as soon as the count passes
the limit, so at most one limit's worth is ever buffered. Both answer ``413`` with the API's
coded error ``payload_too_large``.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.api.errors import ApiError, fail


def _too_large(limit: int) -> ApiError:
    return fail("payload_too_large", f"the request body is larger than {limit} bytes")


class BodyLimit:
    """Wraps an ASGI app; ``limit_for(path)`` gives the largest body accepted on ``path``.

    Install it inside the app's exception handling (``app.add_middleware``), so the
    :class:`~pipeline.api.errors.ApiError` raised while a handler reads an over-long stream is
    rendered like any other API error (a declared length is answered here directly)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:  # refused before a byte is read
            err = _too_large(limit)
            response = JSONResponse({"errors": [p.to_json() for p in err.problems]},
                                    status_code=err.status, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed one; counting still applies
    return None
