"""What a model card says, gathered from a folder's files without torch: ``card_facts`` (config,
``export.json``, eval results, weights' sparsity, recipe) and ``summarize_recipe``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from obert_modifiers.deployment import MANIFEST, DeploymentError, split_folders
from obert_modifiers.zoo.card.schema import (
    FRONT_MATTER_RE,
    CardError,
    Latency,
    ModelCard,
    RecipeModifier,
    RecipeSummary,
    validate_card,
)
from obert_modifiers.zoo.stubs import Stub, parse_stub

# ----------------------------------------------------------------------------- recipes


class _RecipeLoader(yaml.SafeLoader):
    """Loads SparseML recipes without SparseML: ``!Tag`` mappings become {'__type__': Tag, ...}.

    SparseML registers its modifier tags on ``yaml.SafeLoader`` itself (a process-wide table), and
    exact-tag constructors win over multi-constructors; so this loader keeps its own table with the
    standard YAML tags only, and every ``!Tag`` reaches :func:`_tagged` whether SparseML is loaded or not.
    """

    yaml_constructors = {
        tag: constructor
        for tag, constructor in yaml.SafeLoader.yaml_constructors.items()
        if tag is None or tag.startswith("tag:yaml.org,2002:")
    }


def _tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = {"items": loader.construct_sequence(node, deep=True)}
    else:
        value = {"value": loader.construct_scalar(node)}
    return {"__type__": tag_suffix.split(".")[-1], **value}


_RecipeLoader.add_multi_constructor("!", _tagged)


def summarize_recipe(text: str, file: str | None = None) -> RecipeSummary:
    """The modifiers of a SparseML recipe (yaml, or markdown with front matter), for the card."""
    match = FRONT_MATTER_RE.match(text)
    if match:
        text = match.group(1)
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise CardError(f"recipe {file or ''} is not valid YAML: {error}") from None
    modifiers: list[RecipeModifier] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if "__type__" in node:
                settings = {
                    k: v
                    for k, v in node.items()
                    if k not in ("__type__", "start_epoch", "end_epoch") and _short(v)
                }
                modifiers.append(
                    RecipeModifier(
                        type=node["__type__"],
                        start_epoch=_num(node.get("start_epoch")),
                        end_epoch=_num(node.get("end_epoch")),
                        settings=settings,
                    )
                )
                return
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(data)
    return RecipeSummary(file=file, modifiers=modifiers)


def _short(value: Any) -> bool:
    return (
        isinstance(value, (int, float, str, bool))
        and len(str(value)) <= 60
        or (isinstance(value, list) and len(str(value)) <= 60)
    )


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- folder facts


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CardError(f"{path}: cannot read JSON: {error}") from None
    if not isinstance(data, dict):
        raise CardError(f"{path}: expected a JSON object")
    return data


def _folders(root: Path) -> tuple[Path | None, Path | None]:
    """(deployment folder, training folder) of a zoo-layout, deployment or training folder."""
    try:
        return split_folders(root)
    except DeploymentError as error:
        raise CardError(str(error)) from None


def _as_dict(item: Any) -> dict:
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    if isinstance(item, BaseModel):
        return item.model_dump()
    if isinstance(item, dict):
        return dict(item)
    raise CardError(f"cannot use {item!r} as a card entry: expected a dict or a dataclass")


def _latency_entries(items: Any) -> list[dict]:
    allowed = set(Latency.model_fields)
    entries = []
    for item in items or []:
        data = _as_dict(item)
        if data.get("median_ms") in (None, 0) or data.get("error"):
            continue  # an engine that could not run is reported by the benchmark, not the card
        entries.append({k: v for k, v in data.items() if k in allowed and v is not None})
    return entries


def _metric_entries(metrics: Any, dense: dict | None, dataset: str | None) -> list[dict]:
    if isinstance(metrics, dict):
        items = [{"name": k, "value": v} for k, v in metrics.items()]
    else:
        items = [_as_dict(m) for m in metrics or []]
    for item in items:
        if dense and item.get("name") in dense and item.get("dense_value") is None:
            item["dense_value"] = dense[item["name"]]
        if dataset and not item.get("dataset"):
            item["dataset"] = dataset
    return items


# the metrics a card reports for each task, in this order, as the stock scripts write them into
# eval_results.json: GLUE-style for text classification, SQuAD's exact match and F1 (0-100) for
# question answering, seqeval's entity-level precision / recall / F1 (0-1) for token classification
TASK_METRICS = {
    "text-classification": ("accuracy", "f1", "matthews_correlation", "pearson"),
    "question-answering": ("exact_match", "f1"),
    "token-classification": ("precision", "recall", "f1", "accuracy"),
}
_ANY_TASK_METRICS = tuple(dict.fromkeys(name for names in TASK_METRICS.values() for name in names))


def _head_task(config: dict) -> str | None:
    """question-answering / token-classification from config.json's architecture (a training folder
    has no export.json; the stock token script records ``finetuning_task: ner``, the QA one nothing)."""
    architectures = config.get("architectures")
    for name in architectures if isinstance(architectures, list) else []:
        if str(name).endswith("ForQuestionAnswering"):
            return "question-answering"
        if str(name).endswith("ForTokenClassification"):
            return "token-classification"
    return None


def _eval_metrics(folder: Path | None, task: str | None = None) -> dict[str, float]:
    if folder is None:
        return {}
    wanted = TASK_METRICS.get(task or "", _ANY_TASK_METRICS)
    for name in ("eval_results.json", "all_results.json"):
        path = folder / name
        if path.is_file():
            data = _read_json(path)
            found = {
                key[len("eval_") :]: float(value)
                for key, value in data.items()
                if key.startswith("eval_") and isinstance(value, (int, float)) and not isinstance(value, bool)
            }
            return {metric: found[metric] for metric in wanted if metric in found}
    return {}


def _sparse_tag(
    sparsity: float | None, quantized: bool, num_layers: int | None, base_layers: int | None
) -> str:
    parts = []
    if num_layers and base_layers and num_layers < base_layers:
        parts.append(f"{num_layers}layer")
    if sparsity is not None and sparsity >= 0.05:
        parts.append(f"pruned{round(sparsity * 100)}")
    if quantized:
        parts.append("quant")
    return ("_".join(parts) or "base") + "-none"


def card_facts(folder: str | os.PathLike, **facts: Any) -> ModelCard:
    """Build (and validate) the card front matter from a folder's files plus ``facts``."""
    root = Path(folder)
    if not root.is_dir():
        raise CardError(f"{root}: no such folder")
    deployment, training = _folders(root)
    training_dir = facts.pop("training_dir", None)
    if training_dir is not None:
        training = Path(training_dir)
        if not (training / "config.json").is_file():
            raise CardError(f"{training}: not a training folder (no config.json)")
    # read as raw JSON, not DeploymentManifest: the card shows what the folder says (a hand-made or
    # older export.json still gets a card), and the hub validates the card itself
    export = (
        _read_json(deployment / MANIFEST)
        if deployment and (deployment / MANIFEST).is_file()
        else {}
    )
    config_dir = next((f for f in (training, deployment) if f and (f / "config.json").is_file()), None)
    config = _read_json(config_dir / "config.json") if config_dir else {}

    data: dict[str, Any] = {}
    task = (
        facts.pop("task", None)
        or export.get("task")
        or _head_task(config)
        or config.get("finetuning_task")
        or "text-classification"
    )
    data["task"] = task
    data["domain"] = "nlp"
    data["sub_domain"] = task.replace("-", "_")
    model_type = str(config.get("model_type") or "bert")
    data["architecture"] = re.sub(r"[^.A-Za-z0-9_]", "_", model_type)
    data["framework"] = "pytorch"
    data["repo"] = "huggingface"
    num_layers = export.get("num_layers") or config.get("num_hidden_layers")
    data["num_layers"] = num_layers
    quantized = bool(export.get("quantized", False))
    data["quantized"] = quantized
    base = export.get("source_model") or config.get("_name_or_path")
    if base and not str(base).startswith(("/", ".")):
        data["base_model"] = str(base)

    # sparsity: export.json, else the weights (safetensors, torch zip, ONNX) - no torch needed
    sparsity = export.get("sparsity")
    if not sparsity:
        from obert_modifiers.zoo.weights import layer_sparsity, read_onnx_initializers, read_weights

        weights = read_weights(training) if training else None
        if weights is None and deployment and (deployment / "model.onnx").is_file():
            weights = read_onnx_initializers(deployment / "model.onnx")
        if weights:
            overall, per_layer = layer_sparsity(weights)
            sparsity = {"overall": overall, "per_layer": per_layer}
    if sparsity:
        data["sparsity"] = sparsity
    # structured pruning: per-layer heads / FFN widths and the latency table's prediction
    if isinstance(export.get("structure"), dict):
        data["structure"] = export["structure"]
    elif isinstance(config.get("obert_structure"), dict):
        shapes = config["obert_structure"]
        data["structure"] = {"heads": shapes.get("heads", []), "ffn": shapes.get("ffn", [])}
        prediction = config.get("obert_ziplm")
        if isinstance(prediction, dict):
            keys = ("target_speedup", "predicted_speedup", "predicted_latency", "dense_latency", "unit")
            data["structure"].update({k: prediction.get(k) for k in keys})
            data["structure"]["latency_key"] = prediction.get("latency_key")

    # recipe
    for candidate in (deployment, training):
        if candidate and (candidate / "recipe.yaml").is_file():
            data["recipe"] = summarize_recipe(
                (candidate / "recipe.yaml").read_text(), "recipe.yaml"
            ).model_dump()
            break

    # size
    size: dict[str, Any] = {}
    if deployment and (deployment / "model.onnx").is_file():
        size["onnx_bytes"] = (deployment / "model.onnx").stat().st_size
    if training:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (training / name).is_file():
                size["weights_bytes"] = (training / name).stat().st_size
                break
    if export.get("num_parameters"):
        size["num_parameters"] = int(export["num_parameters"])
    if size:
        data["size"] = size

    # facts from the caller override what the files say
    stub = facts.pop("stub", None)
    if stub is not None:
        parsed: Stub = parse_stub(str(stub))
        data.update({k: v for k, v in parsed.fields().items()})
        data["stub"] = str(parsed)
    dense = facts.pop("dense_metrics", None)
    metrics = facts.pop("metrics", None)
    if metrics is None:
        metrics = _eval_metrics(training, task) or _eval_metrics(root, task)
    latency = facts.pop("latency", None) or facts.pop("benchmarks", None)
    data.update({k: v for k, v in facts.items() if v is not None})
    data["metrics"] = _metric_entries(metrics, dense, data.get("dataset"))
    data["latency"] = _latency_entries(latency)
    if not data.get("sparse_tag"):
        overall = (data.get("sparsity") or {}).get("overall")
        data["sparse_tag"] = _sparse_tag(overall, quantized, num_layers, facts.get("base_num_layers"))
    data.pop("base_num_layers", None)
    return validate_card(data, source=f"for {root}")
