"""Models: health, search, resolve a stub, read a model and its card, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from obert_modifiers.version import __version__
from obert_modifiers.zoo.protocol import API_PREFIX
from obert_modifiers.zoo.server.deps import BaseUrl, HubDep, Owner
from obert_modifiers.zoo.server.schemas import ERRORS, ModelDetail, SearchResult
from obert_modifiers.zoo.service import HubError, model_detail, model_summary

router = APIRouter(prefix=API_PREFIX)
Filter = Annotated[str | None, Query(max_length=100)]


@router.get("/health", tags=["meta"])
def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/models", response_model=SearchResult, tags=["models"], responses=ERRORS)
def search_models(
    hub: HubDep,
    base_url: BaseUrl,
    q: Annotated[str | None, Query(max_length=200, description="words to find in stub and card")] = None,
    domain: Filter = None,
    sub_domain: Filter = None,
    task: Filter = None,
    architecture: Filter = None,
    dataset: Filter = None,
    sparse_tag: Filter = None,
    framework: Filter = None,
    repo: Filter = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> dict:
    filters = {
        "domain": domain,
        "sub_domain": sub_domain,
        "task": task,
        "architecture": architecture,
        "dataset": dataset,
        "sparse_tag": sparse_tag,
        "framework": framework,
        "repo": repo,
    }
    total, rows = hub.search(filters, q, limit, offset)
    return {
        "total": total,
        "limit": limit,
        "offset": offset,
        "models": [model_summary(m, base_url) for m in rows],
    }


@router.get("/resolve", response_model=ModelDetail, tags=["models"], responses=ERRORS)
def resolve(
    hub: HubDep, base_url: BaseUrl, stub: Annotated[str, Query(max_length=600, description="zoo:... stub")]
) -> dict:
    return model_detail(hub.resolve(stub), base_url)


@router.get("/models/{model_id}", response_model=ModelDetail, tags=["models"], responses=ERRORS)
def get_model(hub: HubDep, base_url: BaseUrl, model_id: str) -> dict:
    return model_detail(hub.get(model_id), base_url)


@router.get("/models/{model_id}/card", tags=["models"], responses=ERRORS, response_class=Response)
def get_card(hub: HubDep, model_id: str) -> Response:
    model = hub.get(model_id)
    card_file = next((f for f in model.files if f.path == "model.md"), None)
    if card_file is None:
        raise HubError(404, f"{model.stub} has no model.md")
    return Response(hub.store.read_bytes(card_file.sha256), media_type="text/markdown; charset=utf-8")


@router.delete("/models/{model_id}", tags=["models"], responses=ERRORS)
def delete_model(hub: HubDep, model_id: str, owner: Owner) -> dict[str, str]:
    model = hub.delete(model_id, owner)
    return {"deleted": model.stub, "id": model.id}
