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
    if not _bearer_matches(request, state.admin_token):
        raise UnauthorizedError(
            "admin routes need the header 'Authorization: Bearer <admin token>'",
            headers={"WWW-Authenticate": 'Bearer realm="caveat-admin"'},
        )


Admin = Depends(require_admin)


async def require_feedback(request: Request, state: State) -> None:
    """``POST /v1/feedback`` takes the feedback token when one is set, else the admin token."""
    token = state.settings.feedback_token
    if token is None:
        await require_admin(request, state)
        return
    if not _bearer_matches(request, token):
        raise UnauthorizedError(
            "feedback needs the header 'Authorization: Bearer <feedback token>'",
            headers={"WWW-Authenticate": 'Bearer realm="caveat-feedback"'},
        )


def _bearer_matches(request: Request, expected: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected.encode())


FeedbackAuth = Depends(require_feedback)
