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
from obert_modifiers.export.graph import INT8_FORMATS, export_onnx_file, int8_formats
from obert_modifiers.export.loading import (
    TOKENIZER_FILES,
    _check_model_dir,
    check_task_head,
    load_model,
    normalize_task,
    resolve_sequence_length,
)
from obert_modifiers.export.parity import INT8_KERNELS, INT8_TOLERANCES, check_parity, int8_kernels_exact

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
    int8_format: str = "auto",
) -> ExportResult:
    """Write a deployment folder (``model.onnx``, ``config.json``, tokenizer files, ``recipe.yaml``,
    ``export.json``) for ``model_dir`` into ``out_dir``, after an ONNX/PyTorch parity check.

    ``sequence_length`` (the export sample's length and the longest parity batch) defaults to 128,
    or to the model's maximum (``max_position_embeddings``) when that is smaller; a longer one than
    the model takes is an error. Everything is written into a staging folder beside ``out_dir`` and
    renamed into place only when the parity check passed; on any error the staging folder is
    removed, and an existing ``out_dir`` is left untouched (it is only replaced with
    ``overwrite=True``).

    ``int8_format`` (QAT models): ``auto`` (the fastest form that passes parity with an exact integer
    kernel on this CPU) or one of :data:`INT8_FORMATS`; ``export.json`` records the choice
    (``int8_choice``: each tried form's max difference, the CPU model and flags).
    """
    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    task = normalize_task(task)
    _check_model_dir(model_dir)
    check_task_head(model_dir, task)
    sequence_length = resolve_sequence_length(model_dir, sequence_length)
    if int8_format != "auto" and int8_format not in INT8_FORMATS:
        raise ExportError(
            f"unknown INT8 format {int8_format!r}: expected auto or one of {', '.join(INT8_FORMATS)}"
        )
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
        report, chosen_format, int8_choice = _export_checked(
            model, tokenizer, staging / "model.onnx", sequence_length, quantized, opset, tolerance, bar,
            int8_format,
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
            int8_format=chosen_format,
            int8_choice=int8_choice,
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
        int8_format=chosen_format,
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


def _cpu() -> dict[str, Any]:
    from obert_modifiers.latency import cpu_flags, cpu_model

    return {"model": cpu_model(), "flags": cpu_flags(("avx2", "avx512f", "avx512_vnni", "avx_vnni"))}


def _export_checked(
    model, tokenizer, onnx_path, sequence_length, quantized, opset, tolerance, bar, int8_format="auto"
):
    """Export ``onnx_path`` and check its parity; returns (parity report, INT8 form or None, the
    ``int8_choice`` record or None).

    FP32: one export, one check. INT8 (:data:`INT8_FORMATS`, fastest on ORT first): ``auto`` keeps
    the first form that passes the parity check within its tolerance (``INT8_TOLERANCES``) *and*
    whose integer kernel is exact on this CPU (:func:`int8_kernels_exact`: without VNNI, ORT's
    UINT8 x INT8 kernel saturates, and ``ort`` gives way to ``ort-u8``); if none is exact, the
    first that passes. A form the caller names is kept if it passes, and otherwise refused in one
    line naming its difference and a form that passes here. The record lists each tried form."""
    if not quantized:
        bar.set_description(f"export: ONNX (FP32, opset {opset})")
        export_onnx_file(model, tokenizer, onnx_path, sequence_length, quantized=False, opset=opset)
        bar.set_description("export: parity check (ONNX Runtime vs PyTorch)")
        report = check_parity(
            model, onnx_path, tokenizer, quantized=False, sequence_length=sequence_length, tolerance=tolerance
        )
        return report, None, None
    if int8_format != "auto" and int8_format not in INT8_FORMATS:
        raise ExportError(
            f"unknown INT8 format {int8_format!r}: expected auto or one of {', '.join(INT8_FORMATS)}"
        )
    exact = int8_kernels_exact()
    tried: dict[str, dict[str, Any]] = {}
    reports: dict[str, Any] = {}
    staged = onnx_path.with_name("candidate.onnx")

    def attempt(form: str):
        bar.set_description(f"export: ONNX (INT8 {form}, opset {opset})")
        export_onnx_file(
            model, tokenizer, staged, sequence_length, quantized=True, opset=opset, int8_format=form
        )
        bar.set_description(f"export: parity check of INT8 {form} (ONNX Runtime vs PyTorch)")
        report = check_parity(
            model,
            staged,
            tokenizer,
            quantized=True,
            sequence_length=sequence_length,
            tolerance=INT8_TOLERANCES[form] if tolerance is None else tolerance,
            raise_on_failure=False,
        )
        kernel = INT8_KERNELS[form]
        tried[form] = {
            "max_abs_diff": report.max_abs_diff,
            "tolerance": report.tolerance,
            "prediction_agreement": report.prediction_agreement,
            "passed": report.passed,
            "kernel": kernel,
            "kernel_exact": exact[kernel],
        }
        reports[form] = report
        return report

    chosen, reason = None, ""
    if int8_format == "auto":
        for form in int8_formats():
            report = attempt(form)
            if report.passed and exact[INT8_KERNELS[form]]:
                chosen = form
                skipped = [f for f in tried if f != form]
                reason = f"fastest form that passes parity with an exact {INT8_KERNELS[form]} kernel here" + (
                    f" ({', '.join(skipped)}: " + "; ".join(_why_not(f, tried[f]) for f in skipped) + ")"
                    if skipped
                    else ""
                )
                os.replace(staged, onnx_path)
                break
            _LOGGER.info(f"export: INT8 {form} not kept: {_why_not(form, tried[form])}")
        if chosen is None:
            passing = [f for f in tried if tried[f]["passed"]]
            if not passing:
                staged.unlink(missing_ok=True)
                worst = reports[int8_formats()[-1]]
                raise ParityError(
                    f"ONNX/PyTorch parity check failed for every INT8 form on {onnx_path}: "
                    + "; ".join(f"{f} {_why_not(f, tried[f])}" for f in tried),
                    worst,
                )
            chosen = passing[0]
            reason = f"no form with an exact integer kernel passes here; {chosen} is the fastest that passes"
            export_onnx_file(
                model, tokenizer, onnx_path, sequence_length, quantized=True, opset=opset, int8_format=chosen
            )
            staged.unlink(missing_ok=True)
    else:
        report = attempt(int8_format)
        if not report.passed:
            alternative = None
            # the form to suggest: the fastest that passes, on a kernel exact here if one does
            for form in sorted(int8_formats(), key=lambda f: not exact[INT8_KERNELS[f]]):
                if form != int8_format and attempt(form).passed:
                    alternative = form
                    break
            staged.unlink(missing_ok=True)
            hint = (
                f"{alternative} passes (max |diff| {tried[alternative]['max_abs_diff']:.3g}): "
                f"use --int8-format {alternative} or auto"
                if alternative
                else "no INT8 form passes here"
            )
            raise ParityError(
                f"--int8-format {int8_format} fails the parity check on this CPU: max |diff| "
                f"{report.max_abs_diff:.3g} > {report.tolerance:g} x max(1, |output|) "
                f"at {report.worst}; {hint}",
                report,
            )
        chosen, reason = int8_format, "requested"
        if not exact[INT8_KERNELS[int8_format]]:
            reason += f" (its {INT8_KERNELS[int8_format]} kernel is not exact on this CPU; it passes parity)"
        os.replace(staged, onnx_path)
    import onnxruntime

    choice = {
        "requested": int8_format,
        "chosen": chosen,
        "reason": reason,
        "tried": tried,
        "cpu": _cpu(),
        "kernels_exact": exact,
        "onnxruntime": onnxruntime.__version__,
    }
    return reports[chosen], chosen, choice


def _why_not(form: str, record: dict[str, Any]) -> str:
    if not record["passed"]:
        return f"max |diff| {record['max_abs_diff']:.3g} fails tolerance {record['tolerance']:g}"
    if not record["kernel_exact"]:
        return f"max |diff| {record['max_abs_diff']:.3g}, but its {record['kernel']} kernel is not exact here"
    return f"max |diff| {record['max_abs_diff']:.3g}"
