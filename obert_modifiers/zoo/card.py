"""Model cards: ``model.md`` = YAML front matter (a pydantic schema; SparseZoo's field names where
they exist) + a markdown body a person wants to read, with PNG plots beside it.

``write_card(folder)`` builds the card from a training output folder, a deployment folder
(``export.json``), or a zoo-layout folder (``deployment/`` + ``training/``); keyword ``facts``
override or add what the files do not say (``stub=``, ``dataset=``, ``metrics=``, ``dense_metrics=``,
``latency=`` (BenchmarkResult objects or dicts), ``license=``, ...). No torch: weights are read with
``obert_modifiers.zoo.weights``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from obert_modifiers.zoo.stubs import Stub, parse_stub

CARD_NAME = "model.md"
SPARSITY_PLOT = "sparsity.png"
LATENCY_PLOT = "latency.png"
_SEGMENT_RE = re.compile(r"^[.A-Za-z0-9_]+$")
_TAG_RE = re.compile(r"^[.A-Za-z0-9_][.A-Za-z0-9_-]*$")


class CardError(ValueError):
    """A model card that is missing, unreadable or fails the schema."""


class Metric(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    value: float
    dense_value: float | None = None
    dataset: str | None = None
    split: str | None = None


class Latency(BaseModel):
    model_config = ConfigDict(extra="forbid")
    engine: str = Field(min_length=1)
    batch_size: int = Field(default=1, ge=1)
    sequence_length: int | None = Field(default=None, ge=1)
    num_cores: int | None = Field(default=None, ge=1)
    median_ms: float = Field(gt=0)
    p90_ms: float | None = Field(default=None, gt=0)
    mean_ms: float | None = Field(default=None, gt=0)
    items_per_second: float | None = Field(default=None, gt=0)


class Sparsity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overall: float = Field(ge=0, le=1)
    per_layer: dict[str, float] = Field(default_factory=dict)

    @field_validator("per_layer")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        for name, fraction in value.items():
            if not 0 <= fraction <= 1:
                raise ValueError(f"layer {name!r} has sparsity {fraction}, expected a fraction in [0, 1]")
        return value


class RecipeModifier(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    start_epoch: float | None = None
    end_epoch: float | None = None
    settings: dict[str, Any] = Field(default_factory=dict)


class RecipeSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str | None = None
    modifiers: list[RecipeModifier] = Field(default_factory=list)


class ModelSize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    onnx_bytes: int | None = Field(default=None, ge=0)
    weights_bytes: int | None = Field(default=None, ge=0)
    num_parameters: int | None = Field(default=None, ge=0)


class ModelCard(BaseModel):
    """The front matter of ``model.md``."""

    model_config = ConfigDict(extra="forbid")

    # SparseZoo's fields (the parts of a v1 stub)
    domain: str
    sub_domain: str
    architecture: str
    sub_architecture: str | None = None
    framework: str = "pytorch"
    repo: str | None = None
    dataset: str | None = None
    training_scheme: str | None = None
    sparse_tag: str | None = None
    # ours
    task: str = Field(min_length=1)
    display_name: str | None = None
    description: str | None = None
    base_model: str | None = None
    license: str | None = None
    metrics: list[Metric] = Field(default_factory=list)
    sparsity: Sparsity | None = None
    num_layers: int | None = Field(default=None, ge=0)
    quantized: bool = False
    recipe: RecipeSummary | None = None
    latency: list[Latency] = Field(default_factory=list)
    size: ModelSize | None = None
    stub: str | None = None

    @field_validator(
        "domain",
        "sub_domain",
        "architecture",
        "sub_architecture",
        "framework",
        "repo",
        "dataset",
        "training_scheme",
    )
    @classmethod
    def _stub_segment(cls, value: str | None) -> str | None:
        if value is not None and not _SEGMENT_RE.match(value):
            raise ValueError(
                f"{value!r} must use only letters, digits, '_' and '.' (it is part of a zoo stub)"
            )
        return value

    @field_validator("sparse_tag")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is not None and not _TAG_RE.match(value):
            raise ValueError(f"{value!r} must use only letters, digits, '_', '.' and '-'")
        return value

    @field_validator("stub")
    @classmethod
    def _stub(cls, value: str | None) -> str | None:
        if value is not None:
            return str(parse_stub(value))
        return value

    def stub_fields(self) -> dict[str, str | None]:
        return {
            "domain": self.domain,
            "sub_domain": self.sub_domain,
            "architecture": self.architecture,
            "sub_architecture": self.sub_architecture,
            "framework": self.framework,
            "repo": self.repo,
            "dataset": self.dataset,
            "training_scheme": self.training_scheme,
            "sparse_tag": self.sparse_tag,
        }


def _error_text(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(card)"
        parts.append(f"field '{field}': {item['msg']}")
    return f"model card {source} refused: " + "; ".join(parts)


def validate_card(data: Any, source: str = CARD_NAME) -> ModelCard:
    """Validate front matter data, raising CardError naming each bad field and why."""
    if not isinstance(data, dict):
        raise CardError(
            f"model card {source} refused: the front matter must be a mapping, got {type(data).__name__}"
        )
    try:
        return ModelCard.model_validate(data)
    except ValidationError as error:
        raise CardError(_error_text(error, source)) from None


_FRONT_RE = re.compile(r"^\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", re.S)


def split_front_matter(text: str, source: str = CARD_NAME) -> tuple[dict, str]:
    match = _FRONT_RE.match(text)
    if not match:
        raise CardError(f"model card {source} refused: no YAML front matter (a '---' block at the top)")
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise CardError(f"model card {source} refused: the front matter is not valid YAML: {error}") from None
    return data if data is not None else {}, text[match.end() :]


def parse_card(text: str, source: str = CARD_NAME) -> tuple[ModelCard, str]:
    """(validated front matter, markdown body) of a card's text."""
    data, body = split_front_matter(text, source)
    return validate_card(data, source), body


def read_card(path: str | os.PathLike) -> tuple[ModelCard, str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CardError(f"model card {path} cannot be read: {error}") from None
    return parse_card(text, str(path))


def render_card(card: ModelCard, body: str) -> str:
    front = yaml.safe_dump(
        card.model_dump(exclude_none=True, mode="json"), sort_keys=False, allow_unicode=True
    )
    return f"---\n{front}---\n\n{body.lstrip()}"


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
    match = _FRONT_RE.match(text)
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
    if (root / "deployment").is_dir() or (root / "training").is_dir():
        deployment = root / "deployment" if (root / "deployment").is_dir() else None
        training = root / "training" if (root / "training").is_dir() else None
        return deployment, training
    if (root / "model.onnx").is_file() or (root / "export.json").is_file():
        return root, None
    if (root / "config.json").is_file():
        return None, root
    raise CardError(
        f"{root}: not a model folder (expected model.onnx/export.json, a Hugging Face config.json, "
        "or deployment/ and training/ subfolders)"
    )


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


def _eval_metrics(folder: Path | None) -> dict[str, float]:
    if folder is None:
        return {}
    for name in ("eval_results.json", "all_results.json"):
        path = folder / name
        if path.is_file():
            data = _read_json(path)
            return {
                key[len("eval_") :]: float(value)
                for key, value in data.items()
                if key.startswith("eval_")
                and isinstance(value, (int, float))
                and key[len("eval_") :]
                in ("accuracy", "f1", "exact_match", "matthews_correlation", "pearson")
            }
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
    export = (
        _read_json(deployment / "export.json")
        if deployment and (deployment / "export.json").is_file()
        else {}
    )
    config_dir = next((f for f in (training, deployment) if f and (f / "config.json").is_file()), None)
    config = _read_json(config_dir / "config.json") if config_dir else {}

    data: dict[str, Any] = {}
    task = (
        facts.pop("task", None)
        or export.get("task")
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
        metrics = _eval_metrics(training) or _eval_metrics(root)
    latency = facts.pop("latency", None) or facts.pop("benchmarks", None)
    data.update({k: v for k, v in facts.items() if v is not None})
    data["metrics"] = _metric_entries(metrics, dense, data.get("dataset"))
    data["latency"] = _latency_entries(latency)
    if not data.get("sparse_tag"):
        overall = (data.get("sparsity") or {}).get("overall")
        data["sparse_tag"] = _sparse_tag(overall, quantized, num_layers, facts.get("base_num_layers"))
    data.pop("base_num_layers", None)
    return validate_card(data, source=f"for {root}")


# ----------------------------------------------------------------------------- body + plots


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _mb(value: int | None) -> str:
    if value is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def render_body(card: ModelCard, plots: dict[str, str]) -> str:
    title = card.display_name or card.stub or f"{card.architecture} {card.task}"
    lines = [f"# {title}", ""]
    what = [
        f"A `{card.architecture}{'-' + card.sub_architecture if card.sub_architecture else ''}` "
        f"model for **{card.task}**"
    ]
    if card.dataset:
        what.append(f" trained on **{card.dataset}**")
    what.append(".")
    facts = []
    if card.sparsity is not None:
        facts.append(f"{_pct(card.sparsity.overall)} of its encoder weights are zero")
    facts.append("weights and activations are INT8" if card.quantized else "it runs in FP32")
    if card.num_layers is not None:
        facts.append(f"{card.num_layers} encoder layers")
    sentence = "; ".join(facts)
    lines += ["".join(what) + " " + sentence[:1].upper() + sentence[1:] + ".", ""]
    if card.description:
        lines += [card.description, ""]
    if card.stub:
        lines += [f"Stub: `{card.stub}`", ""]

    lines += ["## What was done", ""]
    if card.recipe and card.recipe.modifiers:
        lines += [
            f"The recipe (`{card.recipe.file or 'recipe'}`) applies:",
            "",
            "| modifier | epochs | settings |",
            "|---|---|---|",
        ]
        for mod in card.recipe.modifiers:
            epochs = "—"
            if mod.start_epoch is not None or mod.end_epoch is not None:
                epochs = f"{_fmt(mod.start_epoch)} → {_fmt(mod.end_epoch)}"
            settings = ", ".join(f"`{k}={_fmt(v)}`".replace("|", "/") for k, v in mod.settings.items()) or "—"
            lines.append(f"| {mod.type} | {epochs} | {settings} |")
    else:
        lines.append("No recipe was recorded with this model.")
    lines.append("")

    lines += ["## Accuracy", ""]
    if card.metrics:
        lines += ["| metric | dataset | this model | dense model | change |", "|---|---|---|---|---|"]
        for metric in card.metrics:
            dense = "—" if metric.dense_value is None else f"{metric.dense_value:.4f}"
            delta = "—" if metric.dense_value is None else f"{metric.value - metric.dense_value:+.4f}"
            lines.append(
                f"| {metric.name} | {metric.dataset or '—'} | {metric.value:.4f} | {dense} | {delta} |"
            )
    else:
        lines.append("No evaluation results were recorded.")
    lines.append("")

    lines += ["## Sparsity", ""]
    if card.sparsity is not None:
        lines.append(f"Overall: **{_pct(card.sparsity.overall)}** of the pruned weight matrices.")
        if card.sparsity.per_layer:
            lines += ["", "| layer | sparsity |", "|---|---|"]
            lines += [f"| `{name}` | {_pct(value)} |" for name, value in card.sparsity.per_layer.items()]
        if SPARSITY_PLOT in plots:
            lines += ["", f"![per-layer sparsity]({plots[SPARSITY_PLOT]})"]
    else:
        lines.append("Not measured.")
    lines.append("")

    lines += ["## Size", ""]
    size = card.size or ModelSize()
    lines += [
        "| what | size |",
        "|---|---|",
        f"| ONNX file (deployment) | {_mb(size.onnx_bytes)} |",
        f"| PyTorch weights | {_mb(size.weights_bytes)} |",
        f"| parameters | {size.num_parameters if size.num_parameters is not None else '—'} |",
        f"| quantized | {'INT8' if card.quantized else 'no (FP32)'} |",
        "",
    ]

    lines += ["## Latency", ""]
    if card.latency:
        lines += [
            "| engine | batch | sequence | cores | median ms | p90 ms | items/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for lat in card.latency:
            lines.append(
                f"| {lat.engine} | {lat.batch_size} | {lat.sequence_length or '—'} | "
                f"{lat.num_cores or '—'} | "
                f"{lat.median_ms:.3f} | {_fmt(lat.p90_ms)} | "
                f"{_fmt(lat.items_per_second or 1000.0 * lat.batch_size / lat.median_ms)} |"
            )
        if LATENCY_PLOT in plots:
            lines += ["", f"![latency per engine]({plots[LATENCY_PLOT]})"]
    else:
        lines.append("Not benchmarked.")
    lines.append("")

    stub = card.stub or "zoo:..."
    lines += [
        "## How to run it",
        "",
        "Download it from a hub (`OBERT_HUB_URL` names the hub):",
        "",
        "```bash",
        f"obert zoo pull {stub} --out model",
        "```",
        "",
        "DeepSparse (with `SPARSEZOO_API_URL` pointing at the hub, stubs work directly):",
        "",
        "```python",
        "from deepsparse import Pipeline",
        "",
        f'pipeline = Pipeline.create(task="{card.task}", model_path="{stub}")',
        'print(pipeline(sequences=["a gripping, beautifully made film"]))',
        "```",
        "",
        "ONNX Runtime, on the downloaded `deployment/` folder:",
        "",
        "```python",
        "import onnxruntime as ort",
        "from transformers import AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("model/deployment")',
        'session = ort.InferenceSession("model/deployment/model.onnx")',
        'inputs = tokenizer(["a gripping film"], return_tensors="np", padding="max_length", max_length=128)',
        "logits = session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})[0]",
        "```",
        "",
    ]
    if card.license:
        lines += ["## License", "", card.license, ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_plots(card: ModelCard, out_dir: Path) -> dict[str, str]:
    """Write the PNG plots the card has data for; returns {plot name: relative path}."""
    plots: dict[str, str] = {}
    if not (card.sparsity and card.sparsity.per_layer) and not card.latency:
        return plots
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if card.sparsity and card.sparsity.per_layer:
        names = list(card.sparsity.per_layer)
        values = [card.sparsity.per_layer[n] * 100 for n in names]
        short = [re.sub(r"^(bert\.|model\.)?encoder\.layer\.", "L", n).replace(".weight", "") for n in names]
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(names) + 1)))
        ax.barh(range(len(names)), values, color="#3a7ca5")
        ax.set_yticks(range(len(names)), short, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("sparsity (% zeros)")
        ax.set_title(f"Per-layer sparsity (overall {card.sparsity.overall * 100:.1f}%)")
        fig.tight_layout()
        _save_figure(fig, out_dir / SPARSITY_PLOT)
        plt.close(fig)
        plots[SPARSITY_PLOT] = SPARSITY_PLOT
    if card.latency:
        labels = [f"{lat.engine}\nb{lat.batch_size}" for lat in card.latency]
        values = [lat.median_ms for lat in card.latency]
        fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(labels)), 3.2))
        bars = ax.bar(range(len(labels)), values, color="#d1495b")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel("median latency (ms)")
        ax.set_title("Latency per engine")
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
        fig.tight_layout()
        _save_figure(fig, out_dir / LATENCY_PLOT)
        plt.close(fig)
        plots[LATENCY_PLOT] = LATENCY_PLOT
    return plots


def _save_figure(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_card(
    model_or_deployment_dir: str | os.PathLike, out_path: str | os.PathLike | None = None, **facts: Any
) -> Path:
    """Write ``model.md`` (front matter + readable body) and its PNG plots beside it.

    ``out_path`` defaults to ``<dir>/model.md``. ``facts`` override the files, e.g.
    ``stub="zoo:..."``, ``dataset="rotten_tomatoes"``, ``metrics={"accuracy": 0.83}``,
    ``dense_metrics={"accuracy": 0.84}``, ``latency=run_benchmark(...)``, ``license="Apache-2.0"``.
    Raises CardError (naming the field and the reason) when the result fails the schema.
    """
    card = card_facts(model_or_deployment_dir, **facts)
    out = Path(out_path) if out_path is not None else Path(model_or_deployment_dir) / CARD_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = write_plots(card, out.parent)
    _atomic_write_text(out, render_card(card, render_body(card, plots)))
    return out
