"""Deployment folders for DeepSparse and ONNX Runtime, checked against PyTorch before they exist.

:func:`export_deployment` loads a trained model folder the way SparseML's exporter does (config,
weights, then the *structure* of its ``recipe.yaml`` re-applied: QAT modules, dropped layers),
reloads every weight (``pytorch_model*.bin`` or ``model.safetensors``), exports ONNX with dynamic
batch and sequence axes (QAT models are converted to SparseML's INT8 ``QuantizeLinear`` +
``MatMulInteger`` pattern), runs the ONNX file in ONNX Runtime and the PyTorch model on the same
real sentences, and only then renames the staging folder into place.

The parts, each readable alone: :mod:`.errors` (errors and results), :mod:`.loading` (task names,
folder checks, :func:`load_model`), :mod:`.graph` (ONNX export, embedding fold, sparsity),
:mod:`.parity` (the parity check), :mod:`.orchestrate` (:func:`export_deployment`). This module
only re-exports them.
"""

from __future__ import annotations

from obert_modifiers.export.errors import OPSET, ExportError, ExportResult, ParityError, ParityReport
from obert_modifiers.export.graph import export_onnx_file, fold_embedding_qdq, onnx_weight_sparsity
from obert_modifiers.export.loading import (
    DEFAULT_SEQUENCE_LENGTH,
    TASKS,
    TOKENIZER_FILES,
    WEIGHT_FILES,
    load_model,
    max_sequence_length,
    normalize_task,
)
from obert_modifiers.export.orchestrate import export_deployment
from obert_modifiers.export.parity import (
    FP32_TOLERANCE,
    INT8_TOLERANCE,
    SAMPLE_TEXTS,
    check_parity,
    sample_batches,
)

__all__ = [
    "DEFAULT_SEQUENCE_LENGTH",
    "ExportError",
    "ExportResult",
    "FP32_TOLERANCE",
    "INT8_TOLERANCE",
    "OPSET",
    "ParityError",
    "ParityReport",
    "SAMPLE_TEXTS",
    "TASKS",
    "TOKENIZER_FILES",
    "WEIGHT_FILES",
    "check_parity",
    "export_deployment",
    "export_onnx_file",
    "fold_embedding_qdq",
    "load_model",
    "max_sequence_length",
    "normalize_task",
    "onnx_weight_sparsity",
    "sample_batches",
]
