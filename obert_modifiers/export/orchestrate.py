"""``export_deployment``: load, export, check parity, then write the deployment folder (staged
beside its target and renamed into place; ``export.json`` through the deployment contract)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from obert_modifiers.deployment import DeploymentManifest, sha256_file, staged_dir
from obert_modifiers.export.errors import OPSET, ExportError, ExportResult, ParityError
from obert_modifiers.export.graph import export_onnx_file, fold_embedding_qdq
from obert_modifiers.export.loading import (
    TOKENIZER_FILES,
    _check_model_dir,
    check_task_head,
    load_model,
    normalize_task,
    resolve_sequence_length,
)
from obert_modifiers.export.parity import check_parity

_LOGGER = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# facts about the model


def _linear_weight_sparsity(model) -> dict[str, float]:
    from torch import nn

    per_layer = {}
    for name, module in model.named_modules():
        # zero-width linears (a removed block's, kept by its stand-in) have no sparsity to speak of
        if isinstance(module, nn.Linear) and module.weight.numel() == 0:
            continue
        if isinstance(module, nn.Linear) and "classifier" not in name and "qa_outputs" not in name:
            per_layer[f"{name}.weight"] = float((module.weight == 0).float().mean().item())
    return per_layer


def _overall_sparsity(model, per_layer: dict[str, float]) -> float:
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in per_layer if n in params)
    zeros = sum(per_layer[n] * params[n].numel() for n in per_layer if n in params)
    return zeros / total if total else 0.0


def _structure(model) -> dict | None:
    """Per-layer heads/FFN widths of a structurally pruned model, with the latency prediction its
    config records (``!ZipLMPruningModifier``); None for a model that was not shrunk."""
    config = model.config
    if not isinstance(getattr(config, "obert_structure", None), dict):
        return None
    from obert_modifiers.algorithms.shrink import read_structure

    shapes = read_structure(model)
    out: dict[str, Any] = {"heads": shapes["heads"], "ffn": shapes["ffn"]}
    prediction = getattr(config, "obert_ziplm", None)
    if isinstance(prediction, dict):
        keys = ("target_speedup", "predicted_speedup", "predicted_latency", "dense_latency", "unit")
        out.update({k: prediction.get(k) for k in keys})
        out["latency_key"] = prediction.get("latency_key")
    return out


def _num_layers(model) -> int:
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        return int(getattr(model.config, "num_hidden_layers", 0))
    return sum(1 for layer in layers if type(layer).__name__ != "Identity")



@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    """A progress bar that stays on screen when the export finishes and is wiped when it fails, so
    the error is the one line left."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, disable=not enabled, desc="export", unit="step", leave=True)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


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



def export_deployment(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    task: str = "text-classification",
    sequence_length: int | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    opset: int = OPSET,
    tolerance: float | None = None,
) -> ExportResult:
    """Write a deployment folder (``model.onnx``, ``config.json``, tokenizer files, ``recipe.yaml``,
    ``export.json``) for ``model_dir`` into ``out_dir``, after an ONNX/PyTorch parity check.

    ``sequence_length`` (the export sample's length and the longest parity batch) defaults to 128,
    or to the model's maximum (``max_position_embeddings``) when that is smaller; a longer one than
    the model takes is an error. Everything is written into a staging folder beside ``out_dir`` and
    renamed into place only when the parity check passed; on any error the staging folder is
    removed, and an existing ``out_dir`` is left untouched (it is only replaced with
    ``overwrite=True``).
    """
    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    task = normalize_task(task)
    _check_model_dir(model_dir)
    check_task_head(model_dir, task)
    sequence_length = resolve_sequence_length(model_dir, sequence_length)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    if out_dir == model_dir or out_dir in model_dir.parents:
        raise ExportError(f"output folder {out_dir} would overwrite the model folder")

    import torch  # after the checks: a wrong argument is refused in a moment

    from obert_modifiers.algorithms.quantization import bake_int32_biases, is_quantized

    # the staging folder first: an output folder that cannot be written fails before the slow part
    with staged_dir(out_dir, overwrite=overwrite) as staging, _progress(progress, 5) as bar:
        bar.set_description(f"export: loading {model_dir.name}")
        torch.manual_seed(0)
        model, tokenizer, recipe = load_model(model_dir, task)
        quantized = is_quantized(model) or any(getattr(m, "qconfig", None) for m in model.modules())
        if quantized:
            # the forward pass already adds biases on their INT32 grid; storing them rounded makes the
            # QDQ graph (which keeps biases in float) compute the same, and is a no-op for the integer one
            bake_int32_biases(model)
        bar.update()
        report, int8_format = _export_checked(
            model, tokenizer, staging / "model.onnx", sequence_length, quantized, opset, tolerance, bar
        )
        bar.update(2)

        bar.set_description("export: config, tokenizer, recipe")
        _copy_support_files(model_dir, staging, tokenizer)
        per_layer = _linear_weight_sparsity(model)
        overall = _overall_sparsity(model, per_layer)
        num_parameters = int(sum(p.numel() for p in model.parameters()))
        num_layers = _num_layers(model)
        onnx_bytes = (staging / "model.onnx").stat().st_size
        # SparseML's exporter leaves its deployment-folder helper files; keep the folder minimal
        for stray in ("model.data",):
            (staging / stray).unlink(missing_ok=True)
        manifest = DeploymentManifest.create(
            task=task,
            sequence_length=sequence_length,
            opset=opset,
            quantized=bool(quantized),
            int8_format=int8_format,
            num_layers=num_layers,
            num_parameters=num_parameters,
            sparsity={
                "overall": round(overall, 6),
                "per_layer": {k: round(v, 6) for k, v in per_layer.items()},
            },
            parity={
                "max_abs_diff": report.max_abs_diff,
                "tolerance": report.tolerance,
                "num_samples": report.num_samples,
                "prediction_agreement": report.prediction_agreement,
            },
            onnx_bytes=onnx_bytes,
            # what the parity check covered: tools that rewrite model.onnx in place are caught
            # by comparing against this (obert zoo push refuses a changed file)
            onnx_sha256=sha256_file(staging / "model.onnx"),
            source_model=str(model_dir),
            recipe="recipe.yaml" if recipe else None,
            structure=_structure(model),
        )
        # export.json last: its presence marks a finished folder
        manifest.write(staging)
        bar.update()
        bar.set_description(f"export: {out_dir}")
        bar.update()
    return ExportResult(
        path=out_dir,
        max_abs_diff=report.max_abs_diff,
        tolerance=report.tolerance,
        quantized=bool(quantized),
        int8_format=int8_format,
        sparsity=overall,
        onnx_bytes=onnx_bytes,
        opset=opset,
        num_samples=report.num_samples,
        prediction_agreement=report.prediction_agreement,
        num_layers=num_layers,
        num_parameters=num_parameters,
        per_layer_sparsity=per_layer,
        seconds=time.perf_counter() - started,
        sequence_length=sequence_length,
    )


def _export_checked(model, tokenizer, onnx_path, sequence_length, quantized, opset, tolerance, bar):
    """Export ``onnx_path`` and check its parity; returns (parity report, INT8 format or None).

    INT8: SparseML's integer graph (MatMulInteger + INT32 bias) is the one DeepSparse runs with
    its INT8 kernels; it matches PyTorch because QAT models the INT32 bias grid
    (algorithms/quantization.py: int32_bias). The QDQ graph stays as a fallback for models the
    integer conversion gets wrong (DeepSparse gains little on it): keep whichever passes."""
    formats = ["integer", "qdq"] if quantized else ["fp32"]
    for attempt, int8_format in enumerate(formats):
        bar.set_description(f"export: ONNX ({'INT8 ' + int8_format if quantized else 'FP32'}, opset {opset})")
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
        except ParityError as error:
            if attempt == len(formats) - 1:
                raise
            _LOGGER.warning(
                f"export: the {int8_format} INT8 graph fails the parity check ({error}); "
                f"exporting the {formats[attempt + 1]} graph instead"
            )
            continue
        return report, (int8_format if quantized else None)
    raise AssertionError("unreachable: the last format either returns or raises")
