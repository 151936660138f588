"""``obert train TASK ...`` on the modern stack: the stock SparseML training scripts' main flags, run
through :class:`~obert_modifiers.native.trainer.RecipeTrainer` (no SparseML, no ``datasets``).

Tasks: ``text-classification`` and ``question-answering``. The flags are those of
``sparseml.transformers.train.<task>`` (a subset: the ones below), parsed with transformers'
``HfArgumentParser`` together with every ``TrainingArguments`` flag:

- model: ``--model_name_or_path --config_name --tokenizer_name --cache_dir``
- recipe: ``--recipe --recipe_args --distill_teacher`` (a folder, ``self`` or ``disable``)
- data: ``--train_file --validation_file`` (CSV or JSON/JSON lines; question answering: SQuAD-style
  records, ``{"data": [...]}`` as ``obert data prepare squad`` writes, or SQuAD v1.1 nesting),
  ``--dataset_name`` (needs the ``datasets`` package), ``--max_seq_length --pad_to_max_length
  --max_train_samples --max_eval_samples --input_column_names --label_column_name`` and for question
  answering ``--doc_stride --n_best_size --max_answer_length``
- training: ``--output_dir --num_train_epochs --per_device_train_batch_size --learning_rate --seed
  --do_train --do_eval --gradient_accumulation_steps --resume_from_checkpoint ...``

As in the stock scripts: string labels are sorted and become the config's ``id2label``; a recipe's
epochs override ``--num_train_epochs``; the model, ``recipe.yaml``, tokenizer and metrics are saved
in ``--output_dir``. A model folder that holds a ``recipe.yaml`` (a QAT model saved by the native
adapter) is loaded with that recipe's structure (:func:`~obert_modifiers.native.reload.load_model`).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from obert_modifiers.errors import ObertError
from obert_modifiers.native import ner, qa

__all__ = ["NATIVE_TASKS", "DataArguments", "ModelArguments", "RecipeArguments", "TrainError", "main"]

_LOGGER = logging.getLogger(__name__)
NATIVE_TASKS = ("text-classification", "question-answering", "token-classification")


class TrainError(ObertError, ValueError):
    """A training command the native engine cannot run; the message names the flag or file."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "model folder (or hub id, offline: cached only)"})
    config_name: str | None = field(default=None, metadata={"help": "config, if not the model's"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer, if not the model's"})
    cache_dir: str | None = field(default=None, metadata={"help": "hub cache folder"})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "replace a head of another size (another task's checkpoint)"}
    )


@dataclass
class RecipeArguments:
    recipe: str | None = field(default=None, metadata={"help": "recipe file (.yaml or .md)"})
    recipe_args: str | None = field(default=None, metadata={"help": "recipe variables: JSON or k=v,k2=v2"})
    distill_teacher: str | None = field(
        default=None, metadata={"help": "teacher folder, 'self' or 'disable'"}
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "a datasets name (needs datasets)"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "its configuration"})
    train_file: str | None = field(default=None, metadata={"help": "CSV or JSON training file"})
    validation_file: str | None = field(default=None, metadata={"help": "CSV or JSON validation file"})
    max_seq_length: int | None = field(default=None, metadata={"help": "128 (classification), 384 (QA)"})
    pad_to_max_length: bool = field(default=True, metadata={"help": "pad every sequence to max_seq_length"})
    max_train_samples: int | None = field(default=None, metadata={"help": "cap the training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "cap the evaluation examples"})
    input_column_names: str | None = field(default=None, metadata={"help": "text column(s): 'a' or 'a,b'"})
    label_column_name: str = field(default="label", metadata={"help": "label column"})
    doc_stride: int = field(default=128, metadata={"help": "QA: overlap of the context windows"})
    n_best_size: int = field(default=20, metadata={"help": "QA: start/end candidates per window"})
    max_answer_length: int = field(default=30, metadata={"help": "QA: longest answer, in tokens"})


# --------------------------------------------------------------------------------------------
# data, read without the datasets package
# --------------------------------------------------------------------------------------------


def read_records(path: str | Path, flag: str) -> list[dict]:
    """Rows of a CSV file, or records of a JSON file (a list, ``{"data": [...]}``, JSON lines, or
    SQuAD v1.1 nesting flattened to ``id, title, context, question, answers``)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{flag} {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if path.suffix not in (".json", ".jsonl"):
        raise TrainError(f"{flag} {path}: expected a .csv or .json file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise TrainError(f"{flag} {path}: not JSON or JSON lines ({error})") from None
    records = data.get("data", data) if isinstance(data, dict) else data
    if records and isinstance(records[0], dict) and "paragraphs" in records[0]:
        records = qa.flatten_squad(records)
    if not isinstance(records, list):
        raise TrainError(f"{flag} {path}: expected a list of records (or {{'data': [...]}})")
    return records


def _splits(data: DataArguments, need_train: bool, need_eval: bool) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {}
    if data.dataset_name:
        try:
            import datasets
        except ModuleNotFoundError:
            raise TrainError(
                "--dataset_name needs the datasets package (pip install datasets); or pass --train_file "
                "and --validation_file"
            ) from None
        loaded = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
        splits = {name: [dict(r) for r in loaded[name]] for name in ("train", "validation") if name in loaded}
    if data.train_file:
        splits["train"] = read_records(data.train_file, "--train_file")
    if data.validation_file:
        splits["validation"] = read_records(data.validation_file, "--validation_file")
    if need_train and "train" not in splits:
        raise TrainError("--do_train needs --train_file (or --dataset_name)")
    if need_eval and "validation" not in splits:
        raise TrainError("--do_eval needs --validation_file (or --dataset_name)")
    if data.max_train_samples and "train" in splits:
        splits["train"] = splits["train"][: data.max_train_samples]
    if data.max_eval_samples and "validation" in splits:
        splits["validation"] = splits["validation"][: data.max_eval_samples]
    return splits


class Features(torch.utils.data.Dataset):
    """Tokenized features (lists of equal length per key) as a torch dataset of tensor dicts."""

    def __init__(self, columns: dict[str, Sequence]):
        kept = ("offset_mapping", "example_id")  # question answering's post-processing reads them
        self.columns = {k: v for k, v in columns.items() if k not in kept}
        self.extra = {k: v for k, v in columns.items() if k in kept}
        self.size = len(next(iter(self.columns.values())))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return {k: torch.tensor(v[index]) for k, v in self.columns.items()}


def text_columns(records: list[dict], data: DataArguments) -> tuple[str, str | None]:
    """The stock script's choice: --input_column_names, else sentence1/sentence2, else the first
    two columns that are not the label (one if there is only one)."""
    columns = [c for c in records[0] if c != data.label_column_name]
    if data.input_column_names:
        names = data.input_column_names.split(",")
        if len(names) > 2:
            raise TrainError("--input_column_names takes one or two columns")
        missing = [n for n in names if n not in records[0]]
        if missing:
            raise TrainError(
                f"--input_column_names {missing[0]!r} is not a column (columns: {list(records[0])})"
            )
        return names[0], names[1] if len(names) > 1 else None
    if "sentence1" in columns and "sentence2" in columns:
        return "sentence1", "sentence2"
    if not columns:
        raise TrainError(f"the data has no text column besides '{data.label_column_name}'")
    return columns[0], columns[1] if len(columns) > 1 else None


def token_columns(records: list[dict], data: DataArguments) -> tuple[str, str]:
    """The words and tags columns: ``tokens`` and ``ner_tags`` (the stock script's defaults), or the
    first two columns; ``--input_column_names`` / ``--label_column_name`` name them."""
    columns = list(records[0])
    words = data.input_column_names or ("tokens" if "tokens" in columns else columns[0])
    tags = (
        data.label_column_name
        if data.label_column_name in columns
        else ("ner_tags" if "ner_tags" in columns else columns[1] if len(columns) > 1 else None)
    )
    for flag, column in (("--input_column_names", words), ("--label_column_name", tags)):
        if column not in columns:
            raise TrainError(f"{flag} {column!r} is not a column (columns: {columns})")
    return words, tags


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def parse(args: Sequence[str], task: str = "TASK"):
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, RecipeArguments, TrainingArguments), prog=f"obert train {task}"
    )
    try:
        return parser.parse_args_into_dataclasses(args=list(args))
    except SystemExit as exit_:
        if exit_.code:
            raise TrainError(
                "bad arguments (see the message above; obert train TASK --help lists the flags)"
            ) from None
        raise


def main(task: str, args: Sequence[str]) -> dict:
    """Run ``obert train TASK`` with ``args``; returns the metrics written to the output folder."""
    if task not in NATIVE_TASKS:
        raise TrainError(
            f"task {task!r} does not run on the native engine yet (it runs {', '.join(NATIVE_TASKS)}); "
            "use the SparseML stack (make venv) for it"
        )
    model_args, data, recipe_args, training = parse(args, task)
    _log_like_the_stock_scripts(training)
    from transformers import AutoConfig, AutoTokenizer, Trainer, set_seed

    set_seed(training.seed)
    splits = _splits(data, training.do_train, training.do_eval)
    if not splits:
        raise TrainError("nothing to do: pass --do_train and/or --do_eval with their files")
    source = model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or source, cache_dir=model_args.cache_dir
    )
    config = AutoConfig.from_pretrained(model_args.config_name or source, cache_dir=model_args.cache_dir)
    reference = splits.get("train") or splits["validation"]
    if task == "text-classification":
        labels = sorted({str(r[data.label_column_name]) for r in reference})
        config.num_labels = len(labels)
        config.label2id = {label: i for i, label in enumerate(labels)}
        config.id2label = dict(enumerate(labels))
        from transformers import AutoModelForSequenceClassification as auto_class
    elif task == "token-classification":
        words, tags = token_columns(reference, data)
        labels = sorted({str(t) for r in reference for t in r[tags]})
        config.num_labels = len(labels)
        config.label2id = {label: i for i, label in enumerate(labels)}
        config.id2label = dict(enumerate(labels))
        from transformers import AutoModelForTokenClassification as auto_class
    else:
        from transformers import AutoModelForQuestionAnswering as auto_class
    try:
        model = _load(auto_class, source, config, model_args.ignore_mismatched_sizes)
    except ObertError:
        raise
    except (OSError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise TrainError(
            f"--model_name_or_path {source}: cannot load it as {auto_class.__name__}: {first}"
        ) from None
    features = _features(task, splits, tokenizer, data, config)

    kwargs: dict[str, Any] = {
        "model": model,
        "args": training,
        "train_dataset": features.get("train"),
        "eval_dataset": features.get("validation"),
        "processing_class": tokenizer,
    }
    if task == "text-classification":
        kwargs["compute_metrics"] = _accuracy
    elif task == "token-classification":
        kwargs["compute_metrics"] = lambda p: ner.entity_scores(p.predictions, p.label_ids, config.id2label)
        if not data.pad_to_max_length:
            from transformers import DataCollatorForTokenClassification

            kwargs["data_collator"] = DataCollatorForTokenClassification(tokenizer)
    if recipe_args.recipe:
        from obert_modifiers.native.families import with_family_defaults
        from obert_modifiers.native.recipe import load_recipe, parse_recipe_args
        from obert_modifiers.native.trainer import RecipeTrainer

        overrides = parse_recipe_args(recipe_args.recipe_args)
        variables = load_recipe(recipe_args.recipe, overrides).variables
        overrides = with_family_defaults(variables, overrides, config)
        saved = Path(source) / "recipe.yaml"
        trainer = RecipeTrainer(
            recipe=recipe_args.recipe,
            recipe_args=overrides or None,
            teacher=recipe_args.distill_teacher,
            model_recipe=saved if saved.is_file() else None,
            **kwargs,
        )
    else:
        trainer = Trainer(**kwargs)
    metrics: dict[str, Any] = {}
    if training.do_train:
        result = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
        trainer.save_model()
        tokenizer.save_pretrained(training.output_dir)
        metrics.update(result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training.do_eval:
        if task in ("text-classification", "token-classification"):
            evaluation = trainer.evaluate()
        else:
            evaluation = _evaluate_qa(trainer, features["validation_examples"], features["validation"], data)
        trainer.save_metrics("eval", evaluation)
        metrics.update(evaluation)
    return metrics


def _log_like_the_stock_scripts(training) -> None:
    """The package's INFO lines (a ZipLM or oBERT step, with its cost) on stderr from the main process,
    as the stock scripts log the SparseML adapters' lines; a caller's logging set-up is left alone."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
    package = logging.getLogger("obert_modifiers")
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO if training.should_log else logging.WARNING)


def _load(auto_class: Any, source: str, config: Any, ignore_mismatched_sizes: bool = False):
    folder = Path(source)
    if (folder / "recipe.yaml").is_file():
        from obert_modifiers.native.reload import load_model

        return load_model(folder, auto_class, config=config)
    return auto_class.from_pretrained(source, config=config, ignore_mismatched_sizes=ignore_mismatched_sizes)


def _features(task: str, splits: dict, tokenizer, data: DataArguments, config) -> dict:
    length = data.max_seq_length or (128 if task == "text-classification" else 384)
    if length > tokenizer.model_max_length:
        raise TrainError(
            f"--max_seq_length {length} is above the tokenizer's limit {tokenizer.model_max_length}"
        )
    padding = "max_length" if data.pad_to_max_length else False
    out: dict[str, Any] = {}
    for name, records in splits.items():
        if task == "text-classification":
            first, second = text_columns(records, data)
            texts = [str(r[first]) for r in records]
            pairs = [str(r[second]) for r in records] if second else None
            encoded = dict(tokenizer(texts, pairs, truncation=True, max_length=length, padding=padding))
            try:
                encoded["labels"] = [config.label2id[str(r[data.label_column_name])] for r in records]
            except KeyError as error:
                raise TrainError(
                    f"{name} data: label {error.args[0]!r} is not in the training labels"
                ) from None
            out[name] = Features(encoded)
        elif task == "token-classification":
            words, tags = token_columns(records, data)
            try:
                columns = ner.token_features(
                    records, tokenizer, words, tags, config.label2id, length, padding
                )
            except KeyError as error:
                raise TrainError(f"{name} data: tag {error.args[0]!r} is not in the training tags") from None
            out[name] = Features(columns)
        elif name == "train":
            out[name] = Features(qa.train_features(records, tokenizer, length, data.doc_stride, padding))
        else:
            out[name] = Features(qa.eval_features(records, tokenizer, length, data.doc_stride, padding))
            out[f"{name}_examples"] = records
    return out


def _accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def _evaluate_qa(trainer, examples: list[dict], dataset: Features, data: DataArguments) -> dict:
    output = trainer.predict(dataset)
    start, end = output.predictions[:2]
    predictions = qa.postprocess(
        examples, dataset.extra, start, end, data.n_best_size, data.max_answer_length
    )
    scores = qa.squad_scores(examples, predictions)
    return {"eval_exact_match": scores["exact_match"], "eval_f1": scores["f1"], "eval_samples": len(examples)}
