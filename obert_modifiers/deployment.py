"""The deployment-folder contract: what ``obert export`` writes and every other part reads.

A *deployment folder* holds ``model.onnx``, ``config.json``, the tokenizer files, ``recipe.yaml``
(when the model was trained with one) and ``export.json`` (the manifest, written last: its presence
marks a finished folder). A *zoo-layout folder* (what ``obert zoo pull`` writes and ``obert zoo push``
accepts) holds ``deployment/`` and/or ``training/``. A *training folder* is a Hugging Face model
folder (``config.json`` + weights).

This module owns that contract: the ``export.json`` schema (:class:`DeploymentManifest`, read and
written only here, with a format version), the folder kinds (:func:`folder_kind`), the file digest
the hub records (:func:`sha256_file`), and the one way a folder or file is put in place
(:func:`staged_dir`, :func:`atomic_write_text`: build beside, rename into place, restore on failure).
It imports neither torch nor the hub, so export works without the ``[hub]`` extra and the hub
without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from obert_modifiers.errors import ObertError

MANIFEST = "export.json"
ONNX_FILE = "model.onnx"
# 1: the first written schema. Readers accept every version up to FORMAT_VERSION and refuse newer
# ones with a message to upgrade; a field added later gets a default so older folders still read.
FORMAT_VERSION = 1
CHUNK = 1 << 20

FolderKind = Literal["deployment", "zoo", "training"]


class DeploymentError(ObertError):
    """A folder that breaks the deployment contract, e.g.
    ``runs/x/export.json: not a deployment manifest: sequence_length: Field required``."""


class Sparsity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overall: float = Field(ge=0.0, le=1.0)
    per_layer: dict[str, float] = Field(default_factory=dict)


class Parity(BaseModel):
    """What the ONNX/PyTorch parity check measured before the folder was declared good."""

    model_config = ConfigDict(extra="forbid")

    max_abs_diff: float = Field(ge=0.0)
    tolerance: float = Field(ge=0.0)
    num_samples: int = Field(ge=1)
    prediction_agreement: float | None = Field(default=None, ge=0.0, le=1.0)


class Structure(BaseModel):
    """A structurally pruned model's per-layer shapes (``!ZipLMPruningModifier``) and, when a latency
    table chose them, its prediction (``unit``: ``ms`` measured, ``MMAC`` FLOPs; ``latency_key``: where
    the table was measured: runtime, threads, batch, sequence length, precision, CPU)."""

    model_config = ConfigDict(extra="forbid")

    heads: list[int] = Field(description="attention heads kept per encoder layer (0: block removed)")
    ffn: list[int] = Field(description="FFN neurons kept per encoder layer (0: block removed)")
    target_speedup: float | None = Field(default=None, gt=0.0)
    predicted_speedup: float | None = Field(default=None, gt=0.0)
    predicted_latency: float | None = Field(default=None, ge=0.0)
    dense_latency: float | None = Field(default=None, ge=0.0)
    unit: str | None = None
    latency_key: dict[str, Any] | None = None


class DeploymentManifest(BaseModel):
    """``export.json``: the facts of one export. Unknown keys are kept (newer writers may add some)."""

    model_config = ConfigDict(extra="allow")

    format_version: int = Field(default=FORMAT_VERSION, ge=1)
    task: str
    sequence_length: int = Field(ge=1)
    opset: int = Field(ge=1)
    quantized: bool = False
    int8_format: str | None = None
    # how the INT8 form was chosen: requested, chosen, reason, each tried form's parity, the CPU
    # (model, flags) and which ORT integer kernels are exact on it (export/orchestrate.py)
    int8_choice: dict[str, Any] | None = None
    num_layers: int | None = Field(default=None, ge=0)
    num_parameters: int = Field(ge=0)
    sparsity: Sparsity
    parity: Parity
    onnx_bytes: int | None = Field(default=None, ge=0)
    # the sha256 of the model.onnx the parity check ran on: tools that rewrite it are caught
    onnx_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    source_model: str | None = None
    recipe: str | None = None
    # structured pruning: per-layer shapes and the latency table's prediction (None: not shrunk)
    structure: Structure | None = None
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @classmethod
    def create(cls, **fields: Any) -> DeploymentManifest:
        """A manifest from its fields; a value the schema refuses is a :class:`DeploymentError`
        naming the field (not a pydantic traceback)."""
        try:
            return cls.model_validate(fields)
        except ValidationError as error:
            raise DeploymentError(f"{MANIFEST} would be invalid: {_problems(error)}") from None

    @classmethod
    def read(cls, folder: str | os.PathLike) -> DeploymentManifest:
        """The manifest of ``folder`` (a deployment folder, or the file itself)."""
        path = Path(folder)
        if path.is_dir():
            path = path / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DeploymentError(
                f"{path.parent}: not a finished deployment folder (no {MANIFEST}); "
                "export it with `obert export`"
            ) from None
        except (OSError, ValueError) as error:
            raise DeploymentError(f"{path}: cannot read the deployment manifest: {error}") from None
        if not isinstance(data, dict):
            raise DeploymentError(f"{path}: not a deployment manifest: expected a JSON object")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise DeploymentError(
                f"{path}: format_version {version} is newer than this obert-modifiers reads "
                f"({FORMAT_VERSION}); upgrade obert-modifiers"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise DeploymentError(f"{path}: not a deployment manifest: {_problems(error)}") from None

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``export.json`` into ``folder`` atomically; returns its path."""
        path = Path(folder) / MANIFEST
        atomic_write_text(path, self.model_dump_json(indent=2, exclude_none=False) + "\n")
        return path


def _problems(error: ValidationError) -> str:
    """pydantic's complaints, one clause per field: ``sparsity.overall: Input should be ...``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in error.errors()
    )


def read_manifest_if_any(folder: str | os.PathLike) -> DeploymentManifest | None:
    """The manifest of ``folder``, or None when it has none (a bad manifest still raises)."""
    return DeploymentManifest.read(folder) if (Path(folder) / MANIFEST).is_file() else None


def folder_kind(root: str | os.PathLike) -> FolderKind:
    """Which kind of model folder ``root`` is; raises :class:`DeploymentError` for anything else."""
    root = Path(root)
    if not root.is_dir():
        raise DeploymentError(f"{root}: no such folder")
    if (root / "deployment").is_dir() or (root / "training").is_dir():
        return "zoo"
    if (root / ONNX_FILE).is_file() or (root / MANIFEST).is_file():
        return "deployment"
    if (root / "config.json").is_file():
        return "training"
    raise DeploymentError(
        f"{root}: not a model folder (expected {ONNX_FILE}/{MANIFEST}, a Hugging Face config.json, "
        "or deployment/ and training/ subfolders)"
    )


def split_folders(root: str | os.PathLike) -> tuple[Path | None, Path | None]:
    """(deployment folder, training folder) of a zoo-layout, deployment or training folder."""
    root = Path(root)
    kind = folder_kind(root)
    if kind == "zoo":
        deployment, training = root / "deployment", root / "training"
        return (deployment if deployment.is_dir() else None, training if training.is_dir() else None)
    return (root, None) if kind == "deployment" else (None, root)


# models whose position ids start after the padding index (fairseq's convention): they take
# max_position_embeddings - pad_token_id - 1 tokens
_OFFSET_POSITION_MODELS = (
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "longformer",
    "data2vec-text",
)


def max_sequence_length(folder: str | os.PathLike) -> int | None:
    """The most tokens the model in ``folder`` takes (its position embeddings, from ``config.json``),
    or None when the config does not say or cannot be read (callers that need it report why)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    positions = config.get("max_position_embeddings") if isinstance(config, dict) else None
    if not isinstance(positions, int) or isinstance(positions, bool) or positions < 1:
        return None
    if config.get("model_type") in _OFFSET_POSITION_MODELS:
        pad = config.get("pad_token_id")
        positions -= (pad if isinstance(pad, int) else 1) + 1
    return positions


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the digest the hub records and checks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it: readers see the old file or
    the new one, never half of one."""
    path = Path(path)
    # mkstemp makes the file private (0600); the result gets the old file's mode, or rw-r--r--
    mode = path.stat().st_mode & 0o777 if path.is_file() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike, *, overwrite: bool = False, mode: int = 0o755) -> Iterator[Path]:
    """Build a folder beside ``out_dir`` and rename it into place when the block ends cleanly.

    Yields the staging folder. On an exception (Ctrl-C included) the staging folder is removed and
    an existing ``out_dir`` is left exactly as it was. With ``overwrite``, an existing ``out_dir`` is
    moved aside, replaced, and only then deleted; if the final rename fails, it is put back. Without
    ``overwrite``, an ``out_dir`` that exists (or appears meanwhile) is an error naming the flag.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DeploymentError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    # parent folders this call creates, deepest first: removed again if it fails
    created = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    succeeded = False
    try:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        except OSError as error:
            where = next((p for p in (out_dir.parent, *out_dir.parent.parents) if p.exists()), out_dir.parent)
            if where.exists() and not where.is_dir():
                reason = f"{where} is a file, not a folder"
            else:
                reason = f"{error.strerror or error} (in {where})"
            raise DeploymentError(
                f"cannot write {out_dir}: {reason}; choose a folder you can write to"
            ) from None
        try:
            yield staging
            os.chmod(staging, mode)
            try:
                _replace_dir(staging, out_dir, overwrite)
            except OSError as error:
                raise DeploymentError(f"cannot put {out_dir} in place: {error.strerror or error}") from None
            succeeded = True
        finally:
            _remove(staging)
    finally:
        if not succeeded:
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break


def _remove(path: Path) -> None:
    """Remove a file or folder if it is there (best effort: clean-up must not mask an error)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _replace_dir(staging: Path, out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    if not overwrite:
        raise DeploymentError(f"{out_dir} appeared while it was being written; not replacing it")
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    _remove(old)
