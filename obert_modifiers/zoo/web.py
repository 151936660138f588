"""Web pages served by the hub app: a model list with search, and a model page rendering the card
(markdown with tables, plots) and its files with sizes and sha256. The card's raw HTML is not passed
through (cards come from publishers, pages are read by everyone)."""

import json
from collections.abc import Callable
from typing import Annotated

import markdown
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

from obert_modifiers.zoo.service import SEARCH_FIELDS, Hub, file_url, model_summary

_SAFE_SCHEMES = ("http://", "https://", "/", "#", "mailto:")


class _Rewrite(Treeprocessor):
    """Point relative image/link targets at the model's files; drop unsafe URL schemes."""

    def __init__(self, md, resolve: Callable[[str], str]) -> None:
        super().__init__(md)
        self.resolve = resolve

    def run(self, root):
        for element in root.iter():
            for attribute in ("src", "href"):
                value = element.get(attribute)
                if value is None:
                    continue
                lowered = value.strip().lower()
                if lowered.startswith(_SAFE_SCHEMES):
                    continue
                if ":" in lowered.split("/", 1)[0]:  # javascript:, data:, ...
                    element.set(attribute, "#")
                else:
                    element.set(attribute, self.resolve(value))


class _SafeCard(Extension):
    def __init__(self, resolve: Callable[[str], str]) -> None:
        super().__init__()
        self.resolve = resolve

    def extendMarkdown(self, md) -> None:  # noqa: N802 (markdown's API)
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        md.treeprocessors.register(_Rewrite(md, self.resolve), "obert_rewrite", 0)


def render_markdown(text: str, resolve: Callable[[str], str]) -> str:
    return markdown.markdown(text, extensions=["tables", "fenced_code", _SafeCard(resolve)])


def _size(value: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return str(value)


def add_web_routes(app: FastAPI, hub: Hub, base_url: Callable[[Request], str]) -> None:
    env = Environment(
        loader=PackageLoader("obert_modifiers.zoo", "templates"), autoescape=select_autoescape()
    )
    env.filters["size"] = _size

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(
        request: Request,
        q: Annotated[str | None, Query(max_length=200)] = None,
        task: Annotated[str | None, Query(max_length=100)] = None,
        architecture: Annotated[str | None, Query(max_length=100)] = None,
        dataset: Annotated[str | None, Query(max_length=100)] = None,
        sparse_tag: Annotated[str | None, Query(max_length=100)] = None,
    ) -> HTMLResponse:
        filters = {key: None for key in SEARCH_FIELDS}
        filters.update(
            {"task": task, "architecture": architecture, "dataset": dataset, "sparse_tag": sparse_tag}
        )
        total, rows = hub.search(filters, q, 200, 0)
        url = base_url(request)
        html = env.get_template("index.html").render(
            models=[model_summary(m, url) for m in rows],
            total=total,
            q=q or "",
            filters={
                k: v or ""
                for k, v in filters.items()
                if k in ("task", "architecture", "dataset", "sparse_tag")
            },
        )
        return HTMLResponse(html)

    @app.get("/models/{model_id}", response_class=HTMLResponse, include_in_schema=False)
    def model_page(request: Request, model_id: str) -> HTMLResponse:
        model = hub.get(model_id)
        url = base_url(request)
        card_html = render_markdown(model.card_body, lambda rel: file_url(url, model, rel.lstrip("./")))
        html = env.get_template("model.html").render(
            model=model_summary(model, url),
            card=json.loads(model.card_json),
            card_html=card_html,
            files=[
                {"path": f.path, "size": f.size, "sha256": f.sha256, "url": file_url(url, model, f.path)}
                for f in model.files
            ],
        )
        return HTMLResponse(html)
