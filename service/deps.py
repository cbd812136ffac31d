"""Dependencies the routes take: the server state, and the admin check.

Both are ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per request
(docs/benchmarks.md), and neither blocks."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.errors import AdminDisabledError, UnauthorizedError
from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.caveat


State = Annotated[ServiceState, Depends(get_state)]


DISCONNECTED = "caveat.disconnected"  # scope key of the event set when the client goes away (service.app)


def client_gone(request: Request) -> asyncio.Event | None:
    """The event set when the client of ``request`` goes away (closes its connection after sending its body);
    ``None`` when nothing watches the connection."""
    return request.scope.get(DISCONNECTED)


async def require_admin(request: Request, state: State) -> None:
    """Admin routes need ``Authorization: Bearer <token>``; with no token configured they are disabled."""
    if state.admin_token is None:
        raise AdminDisabledError("the admin API is disabled: start the server with CAVEAT_ADMIN_TOKEN set")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), state.admin_token.encode()):
        raise UnauthorizedError(
            "admin routes need the header 'Authorization: Bearer <admin token>'",
            headers={"WWW-Authenticate": 'Bearer realm="caveat-admin"'},
        )


Admin = Depends(require_admin)
