"""What an export raises and returns: :class:`ExportError`, :class:`ParityError` with its
:class:`ParityReport`, and :class:`ExportResult` (the facts of a finished deployment folder)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from obert_modifiers.errors import ObertError

OPSET = 14  # SparseML's default; QDQ export needs >= 13


class ExportError(ObertError, RuntimeError):
    """The model folder cannot be exported (the message names the file or key), e.g.
    ``model folder runs/x does not exist``."""


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
    sequence_length: int = 0  # the export sample's length (the model's maximum at most)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data

