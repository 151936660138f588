"""The shapes of the hub's JSON answers (OpenAPI documents them at ``/docs``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    detail: str


class FileInfo(BaseModel):
    path: str
    size: int
    sha256: str
    url: str


class ModelSummary(BaseModel):
    id: str
    stub: str
    domain: str
    sub_domain: str
    task: str
    architecture: str
    sub_architecture: str | None = None
    framework: str
    repo: str
    dataset: str
    sparse_tag: str
    owner: str
    created: str | None = None
    total_bytes: int
    display_name: str | None = None
    sparsity: float | None = None
    quantized: bool | None = None
    url: str


class ModelDetail(ModelSummary):
    card: dict[str, Any]
    files: list[FileInfo]


class SearchResult(BaseModel):
    total: int
    limit: int
    offset: int
    models: list[ModelSummary]


class CheckResult(BaseModel):
    ok: bool
    stub: str
    missing: list[str]


class GraphQLRequest(BaseModel):
    query: str
    variables: dict[str, Any] | None = None
    operationName: str | None = None  # noqa: N815 (GraphQL's name)


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 415, 422)
}
