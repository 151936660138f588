"""Typed FastAPI dependencies: the hub of the app (``HubDep``), the URL clients reach it at
(``BaseUrl``) and the owner of a write token (``Owner``; answers 401 without a valid one)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from obert_modifiers.zoo.service import Hub, HubError


def get_hub(request: Request) -> Hub:
    return request.app.state.hub


def get_base_url(request: Request) -> str:
    return (request.app.state.public_url or str(request.base_url)).rstrip("/")


HubDep = Annotated[Hub, Depends(get_hub)]
BaseUrl = Annotated[str, Depends(get_base_url)]


def require_owner(hub: HubDep, authorization: Annotated[str | None, Header()] = None) -> str:
    if not authorization:
        raise HubError(
            401,
            "this operation needs a write token: send 'Authorization: Bearer <token>' "
            "(create one on the server with `obert zoo token create NAME`)",
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HubError(401, "malformed Authorization header: expected 'Bearer <token>'")
    owner = hub.db.token_owner(token.strip())
    if owner is None:
        raise HubError(401, "invalid or revoked token")
    return owner


Owner = Annotated[str, Depends(require_owner)]
