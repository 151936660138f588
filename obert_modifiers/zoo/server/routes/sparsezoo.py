"""``/v2/graphql``: the SparseZoo v2 GraphQL subset the sparsezoo 1.8.1 client reads. Public, so its
cost is bounded before anything runs: the body size here, the document's size, field count and
depth in :func:`obert_modifiers.zoo.graphql_api.execute`, and its running time."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from obert_modifiers.zoo.graphql_api import MAX_BODY_BYTES
from obert_modifiers.zoo.server.deps import BaseUrl, HubDep
from obert_modifiers.zoo.server.schemas import ERRORS, GraphQLRequest
from obert_modifiers.zoo.service import HubError

router = APIRouter()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HubError(400, f"GraphQL request of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HubError(400, f"GraphQL request is over the limit of {limit} bytes")
    return bytes(body)


@router.post(
    "/v2/graphql",
    tags=["sparsezoo"],
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": GraphQLRequest.model_json_schema()}},
        }
    },
)
async def graphql(request: Request, hub: HubDep, base_url: BaseUrl) -> JSONResponse:
    """The SparseZoo v2 GraphQL subset (``models(...)`` with files, results, repo names)."""
    from obert_modifiers.zoo.graphql_api import execute

    raw = await _read_body(request, MAX_BODY_BYTES)
    try:
        body = GraphQLRequest.model_validate_json(raw)
    except ValidationError as error:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()[:5]
        )
        raise HubError(
            400, f"GraphQL request refused: expected JSON {{query, variables?, operationName?}} ({detail})"
        ) from None
    payload = await run_in_threadpool(execute, hub, base_url, body.query, body.variables, body.operationName)
    return JSONResponse(payload, status_code=200 if payload.get("data") is not None else 400)
