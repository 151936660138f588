"""The ``obert`` command. Each command group lives beside the code it drives and adds itself to
the root app through a ``register(app)`` function; heavy imports (torch, SparseML) happen inside the
commands, so ``obert --help`` stays fast."""

from __future__ import annotations

import importlib

import typer

# modules that define `register(app: typer.Typer) -> None`
COMMAND_MODULES = (
    "obert_modifiers.commands",  # train, recipe check, data prepare, demo
    "obert_modifiers.export.cli",  # export
    "obert_modifiers.bench.cli",  # benchmark
    "obert_modifiers.zoo.cli",  # card, zoo serve/token/push/pull/search
)

app = typer.Typer(
    name="obert",
    help=(
        "Compress BERT-family models with SparseML recipes: oBERT pruning, layer dropping, QAT and "
        "distillation; export to DeepSparse / ONNX Runtime; publish to a model hub."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _build() -> typer.Typer:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
    return app


def main() -> None:
    _build()()


if __name__ == "__main__":
    main()
