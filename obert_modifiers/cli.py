"""The ``obert`` command. Each command group lives beside the code it drives and adds itself to
the root app through a ``register(app)`` function; heavy imports (torch, SparseML) happen inside the
commands, so ``obert --help`` stays fast.

Errors are handled in one place, :class:`ObertGroup`: an :class:`~obert_modifiers.errors.ObertError`
(or an ``OSError``: a file that cannot be read or written, named by its message) raised by any
command prints ``error: <message>`` as one line on stderr and exits 1, without a traceback (the
message names what was wrong and where); a command that needs an optional dependency the install
lacks names the extra to install. Usage errors stay click's (exit 2); ``obert recipe check`` exits 2
on a bad recipe, as documented.
"""

from __future__ import annotations

import importlib

import click
import typer
from typer.core import TyperGroup

from obert_modifiers.errors import ObertError

# modules that define `register(app: typer.Typer) -> None`
COMMAND_MODULES = (
    "obert_modifiers.commands",  # train, recipe check, data prepare, demo
    "obert_modifiers.export.cli",  # export
    "obert_modifiers.bench.cli",  # benchmark
    "obert_modifiers.zoo.cli",  # card, zoo serve/token/push/pull/search
)


# top-level module of an optional dependency -> the extra that installs it
EXTRA_OF = {
    "torch": "sparseml",
    "transformers": "sparseml",
    "onnx": "sparseml",
    "onnxruntime": "sparseml",
    "datasets": "sparseml",
    "sparseml": "sparseml",
    "sparsezoo": "sparseml",
    "matplotlib": "sparseml",
    "deepsparse": "deepsparse",
    "httpx": "hub",
    "fastapi": "hub",
    "uvicorn": "hub",
    "sqlalchemy": "hub",
    "graphql": "hub",
    "jinja2": "hub",
    "markdown": "hub",
}


def missing_extra_line(error: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install, when ``error`` is an optional dependency missing."""
    top = (error.name or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    hint = (
        "pip install 'obert-modifiers[sparseml]' (the SparseML 1.8 stack; `make venv` builds it)"
        if extra == "sparseml"
        else f"pip install 'obert-modifiers[{extra}]'"
    )
    return f"error: this command needs {top}, which is not installed: {hint}"


def error_line(error: BaseException) -> str:
    """``error: <message>`` on one line (messages quoting third-party text may span several)."""
    return "error: " + (" ".join(str(error).split()) or error.__class__.__name__)


class ObertGroup(TyperGroup):
    """The root command group: turns an :class:`ObertError` from any subcommand into one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ObertError, OSError) as error:  # ours name the place; OSError's name the file
            typer.secho(error_line(error), err=True, fg="red")
            raise typer.Exit(1) from None
        except ModuleNotFoundError as error:
            line = missing_extra_line(error)
            if line is None:  # not an optional dependency: a real bug, keep its traceback
                raise
            typer.secho(line, err=True, fg="red")
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=ObertGroup,
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
