"""``obert card MODEL_DIR`` and the ``obert zoo`` group (serve, token, push, pull, search, delete)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

zoo_app = typer.Typer(
    help="Model hub: serve it, publish to it, pull from it (SparseZoo-style zoo: stubs).",
    no_args_is_help=True,
)
token_app = typer.Typer(
    help="Write tokens (run on the server: they go straight into its database).", no_args_is_help=True
)
zoo_app.add_typer(token_app, name="token")


def _pairs(values: list[str] | None, option: str) -> dict[str, float] | None:
    if not values:
        return None
    result = {}
    for item in values:
        key, sep, value = item.partition("=")
        try:
            result[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r}: expected NAME=NUMBER, e.g. accuracy=0.83", param_hint=option)
    return result


def card_command(
    model_dir: Path = typer.Argument(..., help="training output, deployment folder, or zoo-layout folder"),
    out: Path | None = typer.Option(None, "--out", help="card path (default MODEL_DIR/model.md)"),
    stub: str | None = typer.Option(
        None, help="zoo: stub; fills domain, architecture, dataset, sparse tag..."
    ),
    dataset: str | None = typer.Option(None, help="dataset name (stub form, e.g. rotten_tomatoes)"),
    license: str | None = typer.Option(None, "--license", help="license of the weights"),
    metric: list[str] | None = typer.Option(None, "--metric", help="NAME=VALUE of this model (repeatable)"),
    dense: list[str] | None = typer.Option(
        None, "--dense", help="NAME=VALUE of the dense model (repeatable)"
    ),
    latency: Path | None = typer.Option(None, help="JSON list of benchmark results (engine, median_ms, ...)"),
    display_name: str | None = typer.Option(None, help="title of the card"),
) -> None:
    """Write model.md (YAML front matter + readable body) and its PNG plots for a model folder."""
    from obert_modifiers.zoo.card import write_card

    facts: dict[str, Any] = {
        "stub": stub,
        "dataset": dataset,
        "license": license,
        "display_name": display_name,
    }
    if metric:
        facts["metrics"] = _pairs(metric, "--metric")
    if dense:
        facts["dense_metrics"] = _pairs(dense, "--dense")
    if latency:
        data = json.loads(latency.read_text())
        facts["latency"] = data.get("results", data) if isinstance(data, dict) else data
    path = write_card(model_dir, out, **{k: v for k, v in facts.items() if v is not None})
    typer.echo(str(path))


@zoo_app.command("serve")
def serve_command(
    db: str | None = typer.Option(
        None,
        help="SQLAlchemy URL (default sqlite:///$OBERT_HUB_HOME/hub.db; "
        "postgresql+psycopg://user:pw@host/db works too)",
    ),
    store: str | None = typer.Option(
        None,
        help="blob store: a directory (default $OBERT_HUB_HOME/store) or s3://BUCKET/PREFIX?endpoint_url=URL",
    ),
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, help="port"),
    public_url: str | None = typer.Option(None, help="URL clients reach this hub at (for download URLs)"),
    max_file_bytes: int = typer.Option(4 * 1024**3, help="largest file accepted"),
    max_upload_bytes: int = typer.Option(8 * 1024**3, help="largest model (all files) accepted"),
    log_level: str = typer.Option(
        "info", help="critical, error, warning, info (refusals, clean-up, publishes) or debug"
    ),
) -> None:
    """Run the hub server (REST API, /docs, SparseZoo v2 GraphQL at /v2/graphql, web pages)."""
    from obert_modifiers.zoo.server import serve
    from obert_modifiers.zoo.service import Limits

    serve(
        db,
        store,
        host,
        port,
        public_url=public_url,
        limits=Limits(max_file_bytes=max_file_bytes, max_upload_bytes=max_upload_bytes),
        log_level=log_level,
    )


@token_app.command("create")
def token_create(
    name: str = typer.Argument(..., help="owner name for the token (re-creating replaces its token)"),
    db: str | None = typer.Option(None, help="the server's database URL"),
    json_output: bool = typer.Option(False, "--json", help="print {name, token} as JSON"),
) -> None:
    """Create a write token; it is printed once and stored only as a hash."""
    from obert_modifiers.zoo.db import Database
    from obert_modifiers.zoo.server import default_db_url

    url = db or default_db_url()
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    token = Database(url).create_token(name)
    typer.echo(json.dumps({"name": name, "token": token}) if json_output else token)


@token_app.command("revoke")
def token_revoke(name: str = typer.Argument(...), db: str | None = typer.Option(None)) -> None:
    """Revoke the token of NAME."""
    from obert_modifiers.zoo.db import Database
    from obert_modifiers.zoo.server import default_db_url

    if not Database(db or default_db_url()).revoke_token(name):
        typer.echo(f"error: no token named {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {name}")


@zoo_app.command("push")
def push_command(
    folder: Path = typer.Argument(
        ..., help="deployment folder (model.onnx, export.json...) or zoo-layout folder"
    ),
    stub: str = typer.Option(
        ..., "--stub", help="zoo:DOMAIN/SUB_DOMAIN/ARCH/FRAMEWORK/REPO/DATASET/SPARSE_TAG"
    ),
    training: Path | None = typer.Option(None, help="training output folder to publish as training/"),
    url: str | None = typer.Option(None, help="hub URL (default $OBERT_HUB_URL)"),
    token: str | None = typer.Option(None, help="write token (default $OBERT_HUB_TOKEN)"),
) -> None:
    """Publish a model under a stub (a card is generated if the folder has none)."""
    from obert_modifiers.zoo.client import push

    record = push(folder, stub, url, token, training=training)
    typer.echo(f"published {record['stub']} ({len(record['files'])} files, id {record['id']})")


@zoo_app.command("pull")
def pull_command(
    stub: str = typer.Argument(...),
    out: Path | None = typer.Option(None, help="folder to write the model to (default: the cache)"),
    url: str | None = typer.Option(None, help="hub URL (default $OBERT_HUB_URL)"),
) -> None:
    """Download a model; prints the path to use as --model_name_or_path (training/ or deployment/)."""
    from obert_modifiers.zoo.client import pull

    typer.echo(str(pull(stub, url, out)))


@zoo_app.command("search")
def search_command(
    text: str | None = typer.Argument(None, help="words to find in stubs and cards"),
    task: str | None = typer.Option(None),
    architecture: str | None = typer.Option(None),
    dataset: str | None = typer.Option(None),
    sparse_tag: str | None = typer.Option(None),
    domain: str | None = typer.Option(None),
    url: str | None = typer.Option(None, help="hub URL (default $OBERT_HUB_URL)"),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """List models matching the filters."""
    from obert_modifiers.zoo.client import search

    result = search(
        text, url, task=task, architecture=architecture, dataset=dataset, sparse_tag=sparse_tag, domain=domain
    )
    if json_output:
        typer.echo(json.dumps(result, indent=2))
        return
    for model in result["models"]:
        sparsity = "" if model.get("sparsity") is None else f"  {model['sparsity'] * 100:.0f}% sparse"
        typer.echo(f"{model['stub']}  {model['total_bytes'] / 1e6:.1f} MB{sparsity}")
    typer.echo(f"{result['total']} model(s)", err=True)


@zoo_app.command("delete")
def delete_command(
    stub: str = typer.Argument(...),
    url: str | None = typer.Option(None, help="hub URL (default $OBERT_HUB_URL)"),
    token: str | None = typer.Option(None, help="write token (default $OBERT_HUB_TOKEN)"),
) -> None:
    """Delete a model you own."""
    from obert_modifiers.zoo.client import delete

    typer.echo(f"deleted {delete(stub, url, token)['deleted']}")


def register(app: typer.Typer) -> None:
    app.command("card")(card_command)
    app.add_typer(zoo_app, name="zoo")


if __name__ == "__main__":  # pragma: no cover
    standalone = typer.Typer()
    register(standalone)
    standalone(sys.argv[1:])
