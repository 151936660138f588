"""Deployment folders for DeepSparse and ONNX Runtime, checked against PyTorch before they exist.

:func:`export_deployment` loads a trained model folder the way SparseML's exporter does (config,
weights, then the *structure* of its ``recipe.yaml`` re-applied: QAT modules, dropped layers),
reloads every weight (``pytorch_model*.bin`` or ``model.safetensors``), exports ONNX with dynamic
batch and sequence axes (QAT models are converted to SparseML's INT8 ``QuantizeLinear`` +
``MatMulInteger`` pattern), runs the ONNX file in ONNX Runtime and the PyTorch model on the same
real sentences, and only then renames the staging folder into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "ExportError",
    "ExportResult",
    "ParityError",
    "ParityReport",
    "SAMPLE_TEXTS",
    "TASKS",
    "check_parity",
    "export_deployment",
    "load_model",
    "onnx_weight_sparsity",
]

_LOGGER = logging.getLogger(__name__)

OPSET = 14  # SparseML's default; QDQ export needs >= 13
FP32_TOLERANCE = 1e-4  # max |logit difference|, scaled by max(1, max |logit|)
INT8_TOLERANCE = 1e-1  # looser: see docs/export.md (integer conversion folds biases into int32)

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

# Real sentences of several lengths (short review snippets to a long news-style paragraph), so
# parity covers padding, truncation and more than one sequence length.
SAMPLE_TEXTS = (
    "A gripping, beautifully acted film.",
    "Dull.",
    "The plot wanders for an hour before anything happens, and the ending feels rushed.",
    "Shares in the carmaker rose sharply after it reported record quarterly profits on Tuesday.",
    "It is not the masterpiece its trailer promised, but the cast is charming and the music works.",
    "The government said the new rail line would open next spring, two years later than planned, "
    "after engineers found problems with the tunnels under the river and costs rose by a third.",
    "What a waste of a talented director.",
    "The striker scored twice in the second half as the home side came back to win three goals to two, "
    "lifting them out of the relegation places for the first time since October and leaving the "
    "visitors' manager to explain another late collapse to an increasingly frustrated crowd.",
)


class ExportError(RuntimeError):
    """The model folder cannot be exported (the message names the file or key)."""


class ParityError(ExportError):
    """ONNX outputs differ from PyTorch outputs by more than the tolerance."""

    def __init__(self, message: str, report: ParityReport):
        super().__init__(message)
        self.report = report


@dataclass
class ParityReport:
    max_abs_diff: float
    tolerance: float
    num_samples: int
    prediction_agreement: float
    worst: str  # where the largest difference is: batch, output, sample, index
    passed: bool


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float
    tolerance: float
    quantized: bool
    sparsity: float
    onnx_bytes: int
    opset: int = OPSET
    num_samples: int = 0
    prediction_agreement: float = 1.0
    num_layers: int = 0
    num_parameters: int = 0
    per_layer_sparsity: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    int8_format: str | None = None  # "integer" (MatMulInteger) or "qdq" for INT8 models

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


# ---------------------------------------------------------------------------------------------
# loading


def normalize_task(task: str) -> str:
    key = task.strip().lower().replace("_", "-")
    key = _TASK_ALIASES.get(key, key)
    if key not in TASKS:
        raise ExportError(
            f"unknown task {task!r}: expected one of {', '.join(TASKS)} (aliases: {', '.join(_TASK_ALIASES)})"
        )
    return key


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
            raise ExportError(f"cannot read weights from {path}: {error}") from error
    return state, files


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
    auto_class = getattr(transformers, TASKS[task])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # QAT buffers are "unexpected" until structure exists
    try:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as error:
            raise ExportError(f"cannot load a tokenizer from {model_dir}: {error}") from error
        try:
            model = auto_class.from_pretrained(str(model_dir), attn_implementation="eager")
        except Exception as error:
            raise ExportError(f"cannot load {model_dir} as {TASKS[task]} ({task}): {error}") from error
    finally:
        transformers.logging.set_verbosity(verbosity)

    # SparseML's loaders swap BERT/QA attention for its quantizable-matmul version; do the same so
    # checkpoints trained by SparseML's own QAT modifier load too
    from sparseml.modifiers.quantization_legacy.modification import modify_model

    model = modify_model(model)
    recipe = model_dir / "recipe.yaml"
    if recipe.is_file():
        from sparseml.pytorch.optim import ScheduledModifierManager

        try:
            manager = ScheduledModifierManager.from_yaml(str(recipe))
        except Exception as error:
            raise ExportError(f"cannot read the recipe {recipe}: {error}") from error
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


# ---------------------------------------------------------------------------------------------
# inputs, outputs, parity


def _input_names(model, tokenizer) -> list[str]:
    import inspect

    encoded = tokenizer(["a"], return_tensors="pt")
    forward_args = list(inspect.signature(model.forward).parameters)
    return [name for name in forward_args if name in encoded]


def sample_batches(
    tokenizer,
    input_names: Sequence[str],
    sequence_length: int,
    texts: Sequence[str] = SAMPLE_TEXTS,
    pad_to_full: bool = False,
) -> list[tuple[str, OrderedDict[str, Any]]]:
    """Named input batches: all texts padded to the longest, three texts padded to
    ``sequence_length``, and a single text (everything padded to ``sequence_length`` when
    ``pad_to_full``, for ONNX files with a fixed sequence axis)."""

    def encode(batch_texts, padding):
        encoded = tokenizer(
            list(batch_texts),
            padding=padding,
            truncation=True,
            max_length=sequence_length,
            return_tensors="np",
        )
        return OrderedDict((name, encoded[name].astype("int64")) for name in input_names)

    longest = "max_length" if pad_to_full else "longest"
    return [
        (
            f"{len(texts)} texts padded to {'longest' if longest == 'longest' else sequence_length}",
            encode(texts, longest),
        ),
        (f"3 texts padded to {sequence_length}", encode(texts[:3], "max_length")),
        ("1 text", encode(texts[-1:], longest)),
    ]


def _torch_outputs(model, batch) -> OrderedDict[str, Any]:
    import torch

    with torch.no_grad():
        output = model(**{name: torch.from_numpy(value) for name, value in batch.items()})
    if hasattr(output, "keys"):
        return OrderedDict((key, output[key].numpy()) for key in output.keys())
    if isinstance(output, (tuple, list)):
        return OrderedDict((f"output_{i}", t.numpy()) for i, t in enumerate(output))
    return OrderedDict(output=output.numpy())


def check_parity(
    model,
    onnx_path: str | os.PathLike,
    tokenizer,
    *,
    quantized: bool,
    sequence_length: int = 128,
    texts: Sequence[str] = SAMPLE_TEXTS,
    tolerance: float | None = None,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Run ``onnx_path`` in ONNX Runtime and ``model`` in PyTorch on real sentences and compare.

    Passes when every output is within ``tolerance * max(1, max |PyTorch output|)`` (default
    1e-4 for FP32, 1e-1 for INT8) and, for INT8, the arg-max prediction agrees on every sample
    whose PyTorch top-2 margin exceeds twice the allowed difference. On failure raises
    :class:`ParityError` naming the largest difference and where it is.
    """
    import numpy as np
    import onnxruntime as ort

    tolerance = (INT8_TOLERANCE if quantized else FP32_TOLERANCE) if tolerance is None else tolerance
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    onnx_inputs = [i.name for i in session.get_inputs()]
    onnx_outputs = [o.name for o in session.get_outputs()]
    model.eval()

    static_length = session.get_inputs()[0].shape[1] if len(session.get_inputs()[0].shape) > 1 else None
    if isinstance(static_length, int):  # exported with a fixed sequence axis (the stock exporter)
        sequence_length = static_length
    worst_diff, worst_where = -1.0, ""
    num_samples, agree, compared, failures = 0, 0, 0, []
    batches = sample_batches(
        tokenizer, onnx_inputs, sequence_length, texts, pad_to_full=isinstance(static_length, int)
    )
    for label, batch in batches:
        reference = _torch_outputs(model, batch)
        produced = session.run(None, dict(batch))
        num_samples += len(next(iter(batch.values())))
        for name, got in zip(onnx_outputs, produced, strict=True):
            want = reference.get(name)
            if want is None:
                raise ExportError(f"ONNX output {name!r} has no PyTorch counterpart ({list(reference)})")
            if want.shape != got.shape:
                raise ParityError(
                    f"output {name!r} on {label}: ONNX shape {got.shape} != PyTorch {want.shape}",
                    ParityReport(math.inf, tolerance, num_samples, 0.0, label, False),
                )
            scale = max(1.0, float(np.abs(want).max()))
            diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
            where = np.unravel_index(int(diff.argmax()), diff.shape)
            if float(diff.max()) > worst_diff:
                worst_diff = float(diff.max())
                worst_where = (
                    f"output {name!r}, batch '{label}', sample {where[0]}, index "
                    f"{tuple(int(i) for i in where[1:])}: PyTorch {float(want[where]):.6g}, "
                    f"ONNX {float(got[where]):.6g}"
                )
            if float(diff.max()) > tolerance * scale:
                failures.append(
                    f"{name} on '{label}' differs by {float(diff.max()):.3g} > {tolerance * scale:.3g}"
                )
            # prediction agreement along the last axis (classes / positions)
            top2 = np.sort(want, axis=-1)[..., -2:] if want.shape[-1] > 1 else None
            same = want.argmax(-1) == got.argmax(-1)
            agree += int(same.sum())
            compared += int(same.size)
            if quantized and top2 is not None:
                clear = (top2[..., 1] - top2[..., 0]) > 2 * tolerance * scale
                if np.any(clear & ~same):
                    failures.append(
                        f"{name} on '{label}': {int((clear & ~same).sum())} clear predictions changed"
                    )
    agreement = agree / compared if compared else 1.0
    report = ParityReport(worst_diff, tolerance, num_samples, agreement, worst_where, not failures)
    if failures and raise_on_failure:
        raise ParityError(
            f"ONNX/PyTorch parity check failed for {onnx_path}: largest difference {worst_diff:.4g} "
            f"at {worst_where}; tolerance {tolerance:g} x max(1, |output|) "
            f"({'INT8' if quantized else 'FP32'}); " + "; ".join(failures[:3]),
            report,
        )
    return report


# ---------------------------------------------------------------------------------------------
# facts about the model


def _linear_weight_sparsity(model) -> dict[str, float]:
    from torch import nn

    per_layer = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "classifier" not in name and "qa_outputs" not in name:
            per_layer[f"{name}.weight"] = float((module.weight == 0).float().mean().item())
    return per_layer


def _overall_sparsity(model, per_layer: dict[str, float]) -> float:
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in per_layer if n in params)
    zeros = sum(per_layer[n] * params[n].numel() for n in per_layer if n in params)
    return zeros / total if total else 0.0


def _num_layers(model) -> int:
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        return int(getattr(model.config, "num_hidden_layers", 0))
    return sum(1 for layer in layers if type(layer).__name__ != "Identity")


def onnx_weight_sparsity(onnx_path: str | os.PathLike, min_size: int = 1024) -> dict[str, float]:
    """Fraction of weights that are zero in each large 2-D initializer of an ONNX file.

    Quantized initializers (UINT8/INT8 with a zero point) count an entry equal to its zero
    point as zero, which is what it dequantizes to."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {init.name: init for init in model.graph.initializer}
    zero_points: dict[str, Any] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMulInteger", "ConvInteger") and len(node.input) >= 4:
            zero_points[node.input[1]] = node.input[3]
        elif node.op_type == "DequantizeLinear" and len(node.input) >= 3:
            zero_points[node.input[0]] = node.input[2]
    result = {}
    for name, init in inits.items():
        array = numpy_helper.to_array(init)
        if array.ndim != 2 or array.size < min_size:
            continue
        zero = 0
        if name in zero_points and zero_points[name] in inits:
            zp = numpy_helper.to_array(inits[zero_points[name]])
            zero = zp.reshape(-1)[0] if zp.size == 1 else zp.reshape(1, -1)
        result[name] = float(np.mean(array == zero))
    return result


# ---------------------------------------------------------------------------------------------
# export


def _progress(enabled: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="export", unit="step", leave=True)


def _copy_support_files(model_dir: Path, staging: Path, tokenizer) -> list[str]:
    copied = []
    config = json.loads((model_dir / "config.json").read_text())
    # DeepSparse's pipeline validates labels as strings; integer label names break it
    if isinstance(config.get("id2label"), dict):
        config["id2label"] = {str(k): str(v) for k, v in config["id2label"].items()}
        config["label2id"] = {str(v): int(k) for k, v in config["id2label"].items()}
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied.append("config.json")
    # tokenizer files as the tokenizer writes them (vocab.txt included), then any extra ones
    tokenizer.save_pretrained(str(staging))
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file() and not (staging / name).exists():
            shutil.copyfile(model_dir / name, staging / name)
    copied += [name for name in TOKENIZER_FILES if (staging / name).exists()]
    if (model_dir / "recipe.yaml").is_file():
        shutil.copyfile(model_dir / "recipe.yaml", staging / "recipe.yaml")
        copied.append("recipe.yaml")
    return copied


def export_onnx_file(
    model,
    tokenizer,
    onnx_path: Path,
    sequence_length: int,
    *,
    quantized: bool,
    opset: int = OPSET,
    int8_format: str = "integer",
) -> None:
    """Export ``model`` to ``onnx_path`` with dynamic batch and sequence axes. QAT models are
    converted to SparseML's integer pattern (``QuantizeLinear`` + ``MatMulInteger``) with
    ``int8_format="integer"``, or kept as ``QuantizeLinear``/``DequantizeLinear`` pairs with ``"qdq"``."""
    import torch
    from sparseml.pytorch.utils import export_onnx

    input_names = _input_names(model, tokenizer)
    encoded = tokenizer(
        list(SAMPLE_TEXTS[:2]),
        padding="max_length",
        truncation=True,
        max_length=sequence_length,
        return_tensors="pt",
    )
    sample = OrderedDict((name, encoded[name].to(torch.int64)) for name in input_names)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    # dynamo=False: torch >= 2.9 defaults to the dynamo exporter, which SparseML's QDQ passes
    # do not understand (and which needs onnxscript)
    export_onnx(
        model,
        sample,
        str(onnx_path),
        opset=opset,
        convert_qat=quantized and int8_format == "integer",
        dynamic_axes=dynamic_axes,
        dynamo=False,
    )


def fold_embedding_qdq(onnx_path: Path) -> int:
    """Replace ``QuantizeLinear -> DequantizeLinear`` pairs on constant tables that feed a ``Gather``
    (fake-quantized embeddings in a QDQ graph) with the dequantized FP32 table. The values are exactly
    what the pair computes, so outputs do not change; DeepSparse 1.8 aborts on the unfolded pattern
    (``Assertion at src/lib/engine/compute/primitive/gather.cpp:15``). Returns the pairs folded."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def constant(name: str):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    folded = 0
    for dequantize in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        if not any(c.op_type == "Gather" for c in consumers.get(dequantize.output[0], [])):
            continue
        quantize = producers.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear" or len(quantize.input) < 3:
            continue
        table, scale, zero = (constant(name) for name in quantize.input[:3])
        if table is None or scale is None or zero is None:
            continue
        limits = np.iinfo(zero.dtype)
        zero32 = zero.astype(np.int64)
        quantized = np.clip(np.rint(table / scale) + zero32, limits.min, limits.max)
        values = ((quantized - zero32) * scale).astype(np.float32)
        graph.node.remove(dequantize)
        graph.node.remove(quantize)
        graph.initializer.append(numpy_helper.from_array(values, dequantize.output[0]))
        folded += 1
    if folded:
        # the FP32 tables, scales and zero points of the folded pairs are no longer read by any node
        used = {name for node in graph.node for name in node.input}
        for init in [i for i in graph.initializer if i.name not in used]:
            graph.initializer.remove(init)
        onnx.save(model, str(onnx_path))
    return folded


def export_deployment(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    task: str = "text-classification",
    sequence_length: int = 128,
    *,
    overwrite: bool = False,
    progress: bool = True,
    opset: int = OPSET,
    tolerance: float | None = None,
) -> ExportResult:
    """Write a deployment folder (``model.onnx``, ``config.json``, tokenizer files, ``recipe.yaml``,
    ``export.json``) for ``model_dir`` into ``out_dir``, after an ONNX/PyTorch parity check.

    Everything is written into a staging folder beside ``out_dir`` and renamed into place only
    when the parity check passed; on any error the staging folder is removed, and an existing
    ``out_dir`` is left untouched (it is only replaced with ``overwrite=True``).
    """
    import torch

    from obert_modifiers.algorithms.quantization import bake_int32_biases, is_quantized
    from obert_modifiers.deployment import sha256_file  # the digest the hub records

    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    task = normalize_task(task)
    _check_model_dir(model_dir)
    if not isinstance(sequence_length, int) or sequence_length < 8:
        raise ExportError(f"sequence_length must be an integer >= 8, got {sequence_length!r}")
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    if out_dir == model_dir or out_dir in model_dir.parents:
        raise ExportError(f"output folder {out_dir} would overwrite the model folder")

    bar = _progress(progress, 5)
    bar.set_description(f"export: loading {model_dir.name}")
    torch.manual_seed(0)
    model, tokenizer, recipe = load_model(model_dir, task)
    quantized = is_quantized(model) or any(getattr(m, "qconfig", None) for m in model.modules())
    if quantized:
        # the forward pass already adds biases on their INT32 grid; storing them rounded makes the
        # QDQ graph (which keeps biases in float) compute the same, and is a no-op for the integer one
        bake_int32_biases(model)
    bar.update()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        onnx_path = staging / "model.onnx"
        # INT8: SparseML's integer graph (MatMulInteger + INT32 bias) is the one DeepSparse runs
        # with its INT8 kernels; it matches PyTorch because QAT models the INT32 bias grid
        # (algorithms/quantization.py: int32_bias). The QDQ graph stays as a fallback for models
        # the integer conversion gets wrong (DeepSparse gains little on it): keep whichever passes.
        formats = ["integer", "qdq"] if quantized else ["fp32"]
        for attempt, int8_format in enumerate(formats):
            bar.set_description(
                f"export: ONNX ({'INT8 ' + int8_format if quantized else 'FP32'}, opset {opset})"
            )
            export_onnx_file(
                model,
                tokenizer,
                onnx_path,
                sequence_length,
                quantized=quantized,
                opset=opset,
                int8_format=int8_format,
            )
            if quantized and int8_format == "qdq":
                fold_embedding_qdq(onnx_path)
            bar.set_description("export: parity check (ONNX Runtime vs PyTorch)")
            try:
                report = check_parity(
                    model,
                    onnx_path,
                    tokenizer,
                    quantized=quantized,
                    sequence_length=sequence_length,
                    tolerance=tolerance,
                )
                break
            except ParityError as error:
                if attempt == len(formats) - 1:
                    raise
                _LOGGER.warning(
                    f"export of {model_dir}: the {int8_format} INT8 graph fails the parity check ({error}); "
                    f"exporting the {formats[attempt + 1]} graph instead"
                )
        bar.update(2)

        bar.set_description("export: config, tokenizer, recipe")
        _copy_support_files(model_dir, staging, tokenizer)
        per_layer = _linear_weight_sparsity(model)
        overall = _overall_sparsity(model, per_layer)
        num_parameters = sum(p.numel() for p in model.parameters())
        num_layers = _num_layers(model)
        onnx_bytes = onnx_path.stat().st_size
        # SparseML's exporter leaves its deployment-folder helper files; keep the folder minimal
        for stray in ("model.data",):
            (staging / stray).unlink(missing_ok=True)
        manifest = {
            "format_version": 1,
            "task": task,
            "sequence_length": sequence_length,
            "opset": opset,
            "quantized": bool(quantized),
            "int8_format": int8_format if quantized else None,
            "num_layers": num_layers,
            "num_parameters": int(num_parameters),
            "sparsity": {
                "overall": round(overall, 6),
                "per_layer": {k: round(v, 6) for k, v in per_layer.items()},
            },
            "parity": {
                "max_abs_diff": report.max_abs_diff,
                "tolerance": report.tolerance,
                "num_samples": report.num_samples,
                "prediction_agreement": report.prediction_agreement,
            },
            "onnx_bytes": onnx_bytes,
            # what the parity check covered: tools that rewrite model.onnx in place are caught
            # by comparing against this (obert zoo push refuses a changed file)
            "onnx_sha256": sha256_file(onnx_path),
            "source_model": str(model_dir),
            "recipe": "recipe.yaml" if recipe else None,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        # export.json last: its presence marks a finished folder
        (staging / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
        bar.update()

        bar.set_description(f"export: {out_dir}")
        _move_into_place(staging, out_dir, overwrite)
        bar.update()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
    return ExportResult(
        path=out_dir,
        max_abs_diff=report.max_abs_diff,
        tolerance=report.tolerance,
        quantized=bool(quantized),
        int8_format=int8_format if quantized else None,
        sparsity=overall,
        onnx_bytes=onnx_bytes,
        opset=opset,
        num_samples=report.num_samples,
        prediction_agreement=report.prediction_agreement,
        num_layers=num_layers,
        num_parameters=int(num_parameters),
        per_layer_sparsity=per_layer,
        seconds=time.perf_counter() - started,
    )


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not overwrite:
            raise ExportError(f"{out_dir} appeared while exporting; not replacing it")
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / out_dir.name)
        os.replace(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
