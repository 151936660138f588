"""Model card schema: ``model.md`` = YAML front matter validated by :class:`ModelCard` (SparseZoo's
field names where they exist) + a markdown body; parse, validate and render the front matter."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from obert_modifiers.errors import ObertError
from obert_modifiers.zoo.stubs import parse_stub

CARD_NAME = "model.md"
SPARSITY_PLOT = "sparsity.png"
LATENCY_PLOT = "latency.png"
# applied with fullmatch (``$`` would accept a trailing newline)
_SEGMENT_RE = re.compile(r"[.A-Za-z0-9_]+")
_TAG_RE = re.compile(r"[.A-Za-z0-9_][.A-Za-z0-9_-]*")


class CardError(ObertError, ValueError):
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


class Structure(BaseModel):
    """Per-layer shapes of a structurally pruned model and the latency table's prediction (from
    ``export.json``'s ``structure``)."""

    model_config = ConfigDict(extra="forbid")

    heads: list[int] = Field(default_factory=list)
    ffn: list[int] = Field(default_factory=list)
    target_speedup: float | None = Field(default=None, gt=0)
    predicted_speedup: float | None = Field(default=None, gt=0)
    predicted_latency: float | None = Field(default=None, ge=0)
    dense_latency: float | None = Field(default=None, ge=0)
    unit: str | None = None
    latency_key: dict[str, Any] | None = None


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
    structure: Structure | None = None
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
        if value is not None and not _SEGMENT_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} must use only letters, digits, '_' and '.' (it is part of a zoo stub)"
            )
        return value

    @field_validator("sparse_tag")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is not None and not _TAG_RE.fullmatch(value):
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


FRONT_MATTER_RE = re.compile(r"^\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", re.S)


def split_front_matter(text: str, source: str = CARD_NAME) -> tuple[dict, str]:
    match = FRONT_MATTER_RE.match(text)
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
