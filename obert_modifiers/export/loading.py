"""Loading a trained model folder for export: task names, folder checks (config, weights,
tokenizer, the task head, the longest sequence the model takes), and :func:`load_model`, which
rebuilds the recipe's structure and reloads every weight."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from obert_modifiers.deployment import max_sequence_length
from obert_modifiers.errors import ObertError
from obert_modifiers.export.errors import ExportError

# task name -> transformers auto class name; aliases map to these
TASKS = {
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}
_TASK_ALIASES = {
    "sentiment-analysis": "text-classification",
    "sequence-classification": "text-classification",
    "glue": "text-classification",
    "ner": "token-classification",
    "qa": "question-answering",
}
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
)
# a folder holds a tokenizer when it has one of these (tokenizer_config.json alone is not one)
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
DEFAULT_SEQUENCE_LENGTH = 128
MIN_SEQUENCE_LENGTH = 8


def one_line(error: BaseException | str) -> str:
    """An error's message on one line (third-party messages often span several)."""
    return " ".join(str(error).split())


def normalize_task(task: str) -> str:
    key = task.strip().lower().replace("_", "-")
    key = _TASK_ALIASES.get(key, key)
    if key not in TASKS:
        raise ExportError(
            f"unknown task {task!r}: expected one of {', '.join(TASKS)} (aliases: {', '.join(_TASK_ALIASES)})"
        )
    return key



def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {path}: {one_line(error)}") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path}: expected a JSON object (a Hugging Face model config)")
    return config


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.exists():
        raise ExportError(f"model folder {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir} is not a folder (expected a Hugging Face model folder)")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} has no config.json: not a Hugging Face model folder")
    if not _weight_files(model_dir):
        raise ExportError(
            f"{model_dir} has no weights (looked for {', '.join(WEIGHT_FILES)} and sharded variants)"
        )
    if not any((model_dir / name).is_file() for name in _VOCABULARY_FILES):
        raise ExportError(
            f"{model_dir} has no tokenizer (looked for {', '.join(_VOCABULARY_FILES)}): copy the tokenizer "
            "files of the model it was trained from into it"
        )


def check_task_head(model_dir: Path, task: str) -> None:
    """Refuse a folder whose config names an architecture without ``task``'s head (a base model,
    or another task's head): loading it would put a random head on the model."""
    head = TASKS[task].removeprefix("AutoModel")  # e.g. "ForSequenceClassification"
    architectures = _read_config(model_dir).get("architectures") or []
    if not isinstance(architectures, list) or not architectures:
        return  # nothing recorded: the weight check in load_model still catches a missing head
    if any(isinstance(name, str) and name.endswith(head) for name in architectures):
        return
    other = next(
        (
            name
            for name, auto_class in TASKS.items()
            if any(str(a).endswith(auto_class.removeprefix("AutoModel")) for a in architectures)
        ),
        None,
    )
    if other is not None:
        hint = f"export it with --task {other}"
    else:
        hint = f"it has no {task} head (a base or pre-training checkpoint): fine-tune it for {task} first"
    raise ExportError(
        f"{model_dir} holds a {architectures[0]} (config.json 'architectures'), not a {task} model; {hint}"
    )


def resolve_sequence_length(model_dir: Path, requested: int | None) -> int:
    """``requested``, checked against the model's maximum; None means 128, or the model's maximum
    when it takes fewer tokens."""
    maximum = max_sequence_length(model_dir)
    if requested is None:
        length = DEFAULT_SEQUENCE_LENGTH if maximum is None else min(DEFAULT_SEQUENCE_LENGTH, maximum)
        if length < MIN_SEQUENCE_LENGTH:
            raise ExportError(
                f"{model_dir} takes at most {maximum} tokens (max_position_embeddings in config.json); "
                f"export needs a sequence length >= {MIN_SEQUENCE_LENGTH}"
            )
        return length
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < MIN_SEQUENCE_LENGTH:
        raise ExportError(
            f"sequence_length (--sequence-length) must be an integer >= {MIN_SEQUENCE_LENGTH}, "
            f"got {requested!r}"
        )
    if maximum is not None and requested > maximum:
        raise ExportError(
            f"sequence_length (--sequence-length) {requested} is longer than {model_dir} takes: at most "
            f"{maximum} tokens (max_position_embeddings in config.json); "
            f"pass --sequence-length {maximum} or less"
        )
    return requested


def _weight_files(model_dir: Path) -> list[Path]:
    """Weight files in loading order: sharded or single .bin first (what SparseML reloads),
    then safetensors (which SparseML 1.8's reload ignores; we read them too)."""
    for pattern in ("pytorch_model*.bin", "model*.safetensors"):
        files = sorted(p for p in model_dir.glob(pattern) if p.is_file())
        if files:
            return files
    return []


def _read_state_dict(model_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    import torch

    files = _weight_files(model_dir)
    state: dict[str, Any] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as error:  # corrupt or truncated file
            raise ExportError(f"cannot read weights from {path}: {one_line(error)}") from error
    return state, files



def _native_stack() -> bool:
    from obert_modifiers.export.graph import sparseml_installed

    return not sparseml_installed()


def load_model(model_dir: str | os.PathLike, task: str = "text-classification"):
    """Build the model in ``model_dir`` with its recipe structure and every saved weight.

    Returns ``(model, tokenizer, recipe_path_or_None)``; the model is in eval mode. Unlike
    SparseML 1.8's reload, safetensors checkpoints work, and a key the model does not take (or a
    weight the checkpoint lacks) is an error naming the key and file instead of a random weight.
    """
    import transformers

    model_dir = Path(model_dir)
    task = normalize_task(task)
    _check_model_dir(model_dir)
    check_task_head(model_dir, task)
    auto_class = getattr(transformers, TASKS[task])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # QAT buffers are "unexpected" until structure exists
    try:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as error:
            raise ExportError(f"cannot load a tokenizer from {model_dir}: {one_line(error)}") from error
        try:
            if _native_stack():  # the modern stack: the recipe's structure (ZipLM shapes, QAT) comes first
                from obert_modifiers.native.reload import load_model as native_load_model

                model = native_load_model(model_dir, auto_class)
                if getattr(model.config, "_attn_implementation", None) == "sdpa":
                    model.set_attn_implementation("eager")
            else:
                model = auto_class.from_pretrained(str(model_dir), attn_implementation="eager")
        except ObertError as error:
            raise ExportError(f"cannot load {model_dir}: {one_line(error)}") from error
        except Exception as error:
            raise ExportError(
                f"cannot load {model_dir} as {TASKS[task]} ({task}): {one_line(error)}"
            ) from error
    finally:
        transformers.logging.set_verbosity(verbosity)

    recipe = model_dir / "recipe.yaml"
    if not _native_stack():
        # SparseML's loaders swap BERT/QA attention for its quantizable-matmul version; do the same so
        # checkpoints trained by SparseML's own QAT modifier load too
        from sparseml.modifiers.quantization_legacy.modification import modify_model

        model = modify_model(model)
    if recipe.is_file() and not _native_stack():
        from sparseml.pytorch.optim import ScheduledModifierManager

        try:
            manager = ScheduledModifierManager.from_yaml(str(recipe))
        except Exception as error:
            raise ExportError(f"cannot read the recipe {recipe}: {one_line(error)}") from error
        manager.apply_structure(model, epoch=math.inf)
    state, files = _read_state_dict(model_dir)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        names = ", ".join(p.name for p in files)
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing from {names} (first: {missing[:3]})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} weights in {names} the model does not have (first: {unexpected[:3]})"
            )
        hint = "" if recipe.is_file() else "; the folder has no recipe.yaml to rebuild its structure"
        raise ExportError(f"{model_dir}: " + "; ".join(parts) + hint)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, tokenizer, recipe if recipe.is_file() else None

