"""``obert train``, ``obert recipe check``, ``obert data prepare`` and ``obert demo``.

Heavy imports (torch, SparseML) happen inside the commands so ``obert --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from obert_modifiers.runs.stock import apply_offline_env

# obert train TASK -> the stock SparseML module whose main() we run
TRAIN_TASKS = {
    "text-classification": "sparseml.transformers.text_classification",
    "question-answering": "sparseml.transformers.question_answering",
    "token-classification": "sparseml.transformers.token_classification",
    "masked-language-modeling": "sparseml.transformers.masked_language_modeling",
}
RESUME_STATE_FILES = ("optimizer.pt", "scheduler.pt")
ALLOW_RESUME_FLAG = "--allow-resume-state"

TRAIN_PARAGRAPHS = (
    "Train with a recipe through the stock SparseML entry point for TASK.",
    f"TASK is one of: {', '.join(TRAIN_TASKS)}. Every other argument goes unchanged to "
    "sparseml.transformers.train.<task> (`obert train TASK --help` shows its options), run in this "
    "process with our recipe tags registered.",
    "Two safety defaults are added. (1) --save_safetensors False unless you pass --save_safetensors: "
    "SparseML 1.8 reloads a saved model's structure (QAT, layer drop) only from pytorch_model*.bin, so "
    "a model.safetensors checkpoint silently reloads with random weights for the restructured layers.",
    "(2) A --model_name_or_path folder holding optimizer.pt / scheduler.pt (an earlier output folder) "
    "is refused: SparseML's trainer would silently resume the old optimizer and learning-rate schedule "
    "from it, and crash on optimizer group sizes if the recipe changes the layers. Start from a folder "
    f"with only config, weights and tokenizer, or pass {ALLOW_RESUME_FLAG} to resume on purpose.",
    "Offline defaults (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1, HF_DATASETS_OFFLINE=1, "
    "NM_DISABLE_ANALYTICS=1) are set unless already set.",
    "Without SparseML (the modern environment), or with OBERT_TRAIN_ENGINE=native, the native engine "
    "trains instead (docs/native.md): text-classification, question-answering and token-classification, "
    "with the stock "
    "scripts' main flags (--model_name_or_path --recipe --recipe_args --distill_teacher --train_file "
    "--validation_file --output_dir --num_train_epochs --per_device_train_batch_size --learning_rate "
    "--max_seq_length --do_train --do_eval --seed ...) and every TrainingArguments flag.",
)
TRAIN_HELP = "\n\n".join(TRAIN_PARAGRAPHS)


TRAIN_ENGINE_VARIABLE = "OBERT_TRAIN_ENGINE"


def train_engine() -> str:
    """``native`` when ``OBERT_TRAIN_ENGINE=native`` or SparseML is not installed, else ``sparseml``."""
    import importlib.util

    if os.environ.get(TRAIN_ENGINE_VARIABLE, "").strip().lower() == "native":
        return "native"
    try:
        return "sparseml" if importlib.util.find_spec("sparseml") is not None else "native"
    except (ImportError, ValueError):
        return "native"


def apply_offline_defaults() -> None:
    """Offline by default (``runs.stock.OFFLINE_ENV``): models and data come from packages; nothing
    calls home. The user's own settings win."""
    apply_offline_env()


def _option_value(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _has_option(args: list[str], name: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in args)


def resume_state_files(model_path: str | os.PathLike | None) -> list[str]:
    """The optimizer/scheduler state files in a model folder (empty for hub ids or clean folders)."""
    if not model_path:
        return []
    folder = Path(model_path)
    if not folder.is_dir():
        return []
    return [name for name in RESUME_STATE_FILES if (folder / name).exists()]


def prepare_train_args(task: str, args: list[str]) -> list[str]:
    """Check and complete the arguments for the stock entry point; raises ``typer.BadParameter``."""
    if task not in TRAIN_TASKS:
        raise typer.BadParameter(f"unknown task {task!r}: expected one of {', '.join(TRAIN_TASKS)}")
    args = list(args)
    allow_resume = ALLOW_RESUME_FLAG in args
    args = [a for a in args if a != ALLOW_RESUME_FLAG]
    model_path = _option_value(args, "--model_name_or_path")
    found = resume_state_files(model_path)
    if found and not allow_resume:
        raise typer.BadParameter(
            f"--model_name_or_path {model_path} holds {' and '.join(found)} (an earlier output folder). "
            "SparseML's trainer would silently resume that optimizer and learning-rate schedule, and "
            "crash on optimizer group sizes if the recipe changes the layers. Start from a copy "
            "without them (config, weights, tokenizer, recipe.yaml), or pass "
            f"{ALLOW_RESUME_FLAG} to resume on purpose."
        )
    wants_help = any(a in ("-h", "--help") for a in args)
    if not _has_option(args, "--save_safetensors") and not wants_help:
        args += ["--save_safetensors", "False"]
    return args


def run_stock_entry_point(task: str, args: list[str]) -> Any:
    """Run ``sparseml.transformers.<task>.main()`` in this process with ``sys.argv`` set."""
    import importlib

    apply_offline_defaults()
    module = importlib.import_module(TRAIN_TASKS[task])
    saved = sys.argv
    sys.argv = [f"sparseml.transformers.train.{task.replace('-', '_')}", *args]
    try:
        return module.main()
    finally:
        sys.argv = saved


class DatasetName(StrEnum):
    rt = "rt"
    bbc = "bbc"
    tweets = "tweets"


class PrepareName(StrEnum):
    """`obert data prepare NAME`: a bundled data set, or the format of the user's --file."""

    rt = "rt"
    bbc = "bbc"
    tweets = "tweets"
    squad = "squad"
    conll = "conll"


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
        console = Console(width=max(console.width, 130))
    return console


def register(app: typer.Typer) -> None:
    @app.command(
        "train",
        help=TRAIN_HELP,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    )
    def train(ctx: typer.Context, task: str = typer.Argument(None, help=f"One of: {', '.join(TRAIN_TASKS)}")):
        if task in (None, "-h", "--help"):
            typer.echo(ctx.get_help())
            raise typer.Exit(0 if task else 2)
        if train_engine() == "native":
            apply_offline_defaults()
            from obert_modifiers.native.train import main

            main(task, list(ctx.args))
            return
        try:
            args = prepare_train_args(task, list(ctx.args))
        except typer.BadParameter as error:
            typer.secho(f"obert train: {error}", err=True, fg="red")
            raise typer.Exit(2) from None
        result = run_stock_entry_point(task, args)
        if isinstance(result, int) and result:
            raise typer.Exit(result)

    recipe_app = typer.Typer(help="Recipes: check that SparseML loads them and see what they do.")
    app.add_typer(recipe_app, name="recipe")

    @recipe_app.command("check")
    def recipe_check(
        file: Path = typer.Argument(..., help="Recipe file (.yaml, or .md with YAML front matter)"),
        recipe_args: str = typer.Option(
            None, "--recipe-args", help="Override recipe variables: JSON or k=v,k2=v2"
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the modifiers as JSON instead of a table"),
    ):
        """Check that SparseML loads a recipe; print its modifiers and parameters.

        FILE is loaded with SparseML's ScheduledModifierManager (our tags included) and every
        modifier is printed: stage, tag, schedule and each resolved parameter. Exits 2 with a message
        naming the line, modifier and key when the recipe is wrong."""
        apply_offline_defaults()
        from obert_modifiers.recipe_check import RecipeCheckError, check_recipe

        try:
            summary = check_recipe(file, recipe_args)
        except RecipeCheckError as error:
            typer.secho(f"recipe check failed: {error}", err=True, fg="red")
            raise typer.Exit(2) from None
        if as_json:
            payload = {
                "path": str(summary.path),
                "max_epochs": summary.max_epochs,
                "warnings": summary.warnings,
                "variables": summary.variables,
                "modifiers": [vars(m) for m in summary.modifiers],
            }
            typer.echo(json.dumps(payload, indent=2, default=str))
            return
        _print_recipe(summary)

    @app.command("latency-table")
    def latency_table_command(
        model: str = typer.Argument(..., help="Model folder (its config.json gives the shape)"),
        output: Path = typer.Option(..., "--output", help="Table file to write (JSON)"),
        runtime: str = typer.Option("onnxruntime", "--runtime", help="onnxruntime, deepsparse or flops"),
        threads: int = typer.Option(2, "--threads", min=1, help="Intra-op threads (the deployment's)"),
        batch_size: int = typer.Option(1, "--batch-size", min=1, help="Batch size"),
        sequence_length: int = typer.Option(128, "--sequence-length", min=1, help="Sequence length"),
        precision: str = typer.Option("fp32", "--precision", help="fp32, or int8 when QAT follows"),
        layers: int = typer.Option(
            None, "--layers", min=1, help="Depth when ZipLM starts (after a layer drop); default: the model's"
        ),
        rounds: int = typer.Option(5, "--rounds", min=1, help="Interleaved timing rounds"),
        refresh: bool = typer.Option(False, "--refresh", help="Measure again even when a cached table fits"),
    ):
        """Measure the latency table ZipLM searches on, here, and write it to a file.

        Run it on the machine you deploy on, with its thread count; then give the file to
        !ZipLMPruningModifier as latency_table_file on the machine that trains (a GPU box need not
        time anything). The table is also cached here. Prints whether it can be trusted: the dense
        model's predicted time against its measured one, and the load while it was measured."""
        apply_offline_defaults()
        from transformers import AutoConfig

        from obert_modifiers.deployment import atomic_write_text
        from obert_modifiers.latency import LatencyTableError, latency_table

        try:
            config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as error:
            message = f"obert latency-table: cannot read a model config from {model!r} ({error})"
            raise LatencyTableError(message) from None
        if layers is not None:
            config.num_hidden_layers = layers
        table = latency_table(  # a FLOPs table is counted: rounds and refresh do not apply
            config, runtime=runtime, threads=threads, batch_size=batch_size,
            sequence_length=sequence_length, precision=precision, rounds=rounds, refresh=refresh,
        )  # fmt: skip
        atomic_write_text(output, table.to_json())
        meta, key = table.meta, table.key
        where = f"{key.runtime} {key.runtime_version} on {key.cpu or 'any CPU'}"
        typer.echo(
            f"{output}: {where}, {key.threads} threads, batch {key.batch_size}, seq {key.sequence_length}, "
            f"{key.precision}, {key.num_hidden_layers} layers"
        )
        if meta.get("source") == "measured":
            load = meta.get("load_average") or ["?"]
            trusted = "yes" if meta["trusted"] else "NO, measure again on a quiet machine"
            typer.echo(
                f"dense model: {meta['dense_measured']:.3f} ms measured, {meta['dense_predicted']:.3f} ms "
                f"predicted ({meta['consistency']:.2f}x); fit residual up to "
                f"{meta['fit']['max_abs_residual_ms']:.3f} ms; measured in {meta['total_s']:.0f} s at "
                f"1-minute load {load[0]:.2f}; trusted: {trusted}"
            )

    data_app = typer.Typer(help="Data sets bundled through registry packages (see docs/data.md).")
    app.add_typer(data_app, name="data")

    @data_app.command("prepare")
    def data_prepare(
        name: PrepareName = typer.Argument(
            ...,
            help="rt (Rotten Tomatoes), bbc (BBC News), tweets; or squad / conll for your own --file",
        ),
        out: Path = typer.Option(..., "--out", help="Output folder (new, empty, or an earlier output)"),
        file: Path = typer.Option(
            None, "--file", help="squad: a SQuAD v1.1 JSON file; conll: a CoNLL-style token file"
        ),
        max_train: int = typer.Option(None, "--max-train", min=1, help="Cap the training rows"),
        max_eval: int = typer.Option(None, "--max-eval", min=1, help="Cap the validation rows"),
        seed: int = typer.Option(42, "--seed", help="Seed of the split and of the slices"),
    ):
        """Write train/validation/test files for a bundled data set or your own QA / token file.

        rt, bbc, tweets: the texts are de-duplicated and split stratified with a fixed seed into CSVs
        (columns sentence,label with label names) that the stock SparseML text-classification command
        reads. squad --file F: a SQuAD v1.1 JSON file (answers checked against their context, ids
        unique) split by paragraph into train/validation/test.json for the stock question-answering
        command. conll --file F: a CoNLL-style token file (token first, BIO tag last, blank lines
        between sentences) split by sentence into train/validation/test.json (tokens, ner_tags) for
        the stock token-classification command. The test split (15 %) does not depend on
        --max-train/--max-eval."""
        from obert_modifiers.data import USER_PREPARERS, DataPrepareError, prepare

        # DataPrepareError, MissingResourceError, DeploymentError: one line from the `obert` handler
        if name.value in USER_PREPARERS:
            if file is None:
                raise DataPrepareError(f"obert data prepare {name.value} needs --file (your data file)")
            info = USER_PREPARERS[name.value](file, out, max_train=max_train, max_eval=max_eval, seed=seed)
            _print_user_data(out, info)
            return
        if file is not None:
            raise DataPrepareError(
                f"--file is for squad or conll; {name.value} is a bundled data set (drop --file)"
            )
        info = prepare(name.value, out, max_train=max_train, max_eval=max_eval, seed=seed)
        _print_data(out, info)

    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder (replaced)"),
        dataset: DatasetName = typer.Option(DatasetName.rt, "--dataset", help="rt or bbc"),
        max_train: int = typer.Option(
            None, "--max-train", min=8, help="Training snippets (default per mode)"
        ),
        recipe: Path = typer.Option(
            None, "--recipe", help="Recipe (default: the packaged demo.yaml, recipes/demo.yaml in a checkout)"
        ),
        quick: bool = typer.Option(False, "--quick", help="Tiny smoke run: tiny random BERT, few steps"),
        seconds: float = typer.Option(None, "--seconds", help="Benchmark seconds per engine"),
    ):
        """Run the main job offline: fine-tune + prune MiniLM-L6, export, benchmark.

        Prepares a Rotten Tomatoes slice, fine-tunes and prunes MiniLM-L6 with the stock SparseML
        text-classification command and recipes/demo.yaml, evaluates on the held-out test split,
        exports a deployment folder, benchmarks DeepSparse and ONNX Runtime on it, and prints one
        summary table (also written to OUT/summary.json)."""
        apply_offline_defaults()
        from obert_modifiers.demo import run_demo

        # a DemoError (an ObertError) is printed as one line by the `obert` handler
        run_demo(
            out_dir=out,
            dataset=dataset.value,
            max_train=max_train,
            recipe=recipe,
            quick=quick,
            bench_seconds=seconds,
        )


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and len(value) > 4:
        return "[" + ", ".join(map(str, value[:4])) + f", ... ({len(value)} items)]"
    return str(value)


def _print_recipe(summary) -> None:
    from rich.table import Table

    table = Table(title=f"{summary.path}: {len(summary.modifiers)} modifiers", show_lines=True)
    has_stages = any(m.stage for m in summary.modifiers)
    table.add_column("#", justify="right")
    if has_stages:
        table.add_column("stage")
    table.add_column("modifier", style="bold", no_wrap=True)
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    table.add_column("parameters", overflow="fold")
    for m in summary.modifiers:
        params = "\n".join(f"{k}: {_format_value(v)}" for k, v in sorted(m.params.items())) or "-"
        row = [str(m.index)] + ([m.stage or ""] if has_stages else [])
        row += [f"!{m.tag}", _format_value(m.start_epoch), _format_value(m.end_epoch), params]
        table.add_row(*row)
    console = _console()
    console.print(table)
    if summary.variables:
        console.print(
            "variables: " + ", ".join(f"{k}={_format_value(v)}" for k, v in summary.variables.items())
        )
    loader = "the native engine resolves it" if summary.engine == "native" else "SparseML loads it"
    console.print(f"recipe OK: {loader}; training epochs: {_format_value(summary.max_epochs)}")
    for warning in summary.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def _print_data(out: Path, info: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{info['title']} -> {out}")
    table.add_column("split")
    table.add_column("rows", justify="right")
    for label in info["labels"]:
        table.add_column(label, justify="right")
    for split, count in info["counts"].items():
        per_label = info["label_counts"][split]
        table.add_row(split, str(count), *(str(per_label.get(label, 0)) for label in info["labels"]))
    console = _console()
    console.print(table)
    console.print(
        f"{info['dedup']['raw']} texts, "
        f"{info['dedup']['unique'] - info['dedup']['conflicting_labels_dropped']} after de-duplication; "
        f"majority-class test accuracy {info['majority_class_test_accuracy']:.3f}; seed {info['seed']}"
    )


def _print_user_data(out: Path, info: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{info['title']} -> {out}")
    table.add_column("split")
    unit = "questions" if info["task"] == "question-answering" else "sentences"
    table.add_column(unit, justify="right")
    extra = "paragraph_counts" if "paragraph_counts" in info else "token_counts"
    table.add_column(extra.split("_")[0] + "s", justify="right")
    for split, count in info["counts"].items():
        table.add_row(split, str(count), str(info[extra][split]))
    console = _console()
    console.print(table)
    train_file = out / "train.json"
    note = f"for the stock {info['task']} command (--train_file {train_file} ...), seed {info['seed']}"

    if info.get("labels"):
        note = f"tags: {', '.join(info['labels'])}; " + note
    console.print(note)
