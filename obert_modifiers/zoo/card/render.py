"""The readable part of a model card: its markdown body, its PNG plots, and ``write_card``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from obert_modifiers.deployment import atomic_write_text
from obert_modifiers.zoo.card.facts import card_facts
from obert_modifiers.zoo.card.schema import (
    CARD_NAME,
    LATENCY_PLOT,
    SPARSITY_PLOT,
    ModelCard,
    ModelSize,
    render_card,
)

# ----------------------------------------------------------------------------- body + plots


# what the metrics of a task are, under its accuracy table (the stock scripts' metrics)
METRIC_NOTES = {
    "question-answering": "Exact match and F1 are SQuAD's (0-100), from the training run's evaluation.",
    "token-classification": "Precision, recall and F1 are seqeval's entity-level scores (0-1); accuracy is "
    "per token.",
}


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
        if card.task in METRIC_NOTES:
            lines += ["", METRIC_NOTES[card.task]]
    else:
        lines.append("No evaluation results were recorded.")
    lines.append("")

    if card.structure is not None:
        lines += _structure_lines(card.structure)

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


def _structure_lines(structure: Any) -> list[str]:
    """The structured-pruning section: per-layer shapes and the latency table's prediction."""
    lines = ["## Structure", ""]
    if structure.predicted_speedup is not None:
        key = structure.latency_key or {}
        where = ", ".join(
            f"{name} {key[name]}"
            for name in ("runtime", "precision", "threads", "batch_size", "sequence_length")
            if key.get(name) is not None
        )
        target = f" (target {structure.target_speedup:g}x)" if structure.target_speedup else ""
        latency = ""
        if structure.predicted_latency is not None and structure.dense_latency is not None:
            unit = structure.unit or ""
            predicted, dense = structure.predicted_latency, structure.dense_latency
            latency = f": {predicted:.4g} {unit} against {dense:.4g} {unit} dense"
        lines += [
            f"Predicted speed-up over the dense model: **{structure.predicted_speedup:.2f}x**{target}"
            f"{latency}, by the latency table ({where or 'setting not recorded'}); not a measurement.",
            "",
        ]
    lines += ["| layer | attention heads | FFN neurons |", "|---|---|---|"]
    for index, (heads, ffn) in enumerate(zip(structure.heads, structure.ffn, strict=False)):
        lines.append(f"| {index} | {heads or 'removed'} | {ffn or 'removed'} |")
    lines.append("")
    return lines


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
    atomic_write_text(out, render_card(card, render_body(card, plots)))
    return out
