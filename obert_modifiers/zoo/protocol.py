"""What client and server agree on: the publish manifest, safe relative file paths, limits."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from obert_modifiers.errors import ObertError
from obert_modifiers.zoo.stubs import parse_stub

API_PREFIX = "/api/v1"
MAX_PATH_LENGTH = 255
MAX_PATH_DEPTH = 8
# patterns that validate input are applied with fullmatch (``$`` would accept a trailing newline)
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]*")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
REQUIRED_FILES = ("model.md", "deployment/model.onnx")


class UnsafePathError(ObertError, ValueError):
    """A file path that is not a safe relative path inside a model."""


def check_relative_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a model, else raise UnsafePathError.

    Allowed: segments of letters, digits and ``_ . + = @ -`` (not starting with ``.`` or ``-``),
    at most 8 deep and 255 characters. So no ``..``, no absolute paths, no backslashes, no hidden
    files, no empty segments, no control characters.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError("file path is empty" if path == "" else f"file path {path!r} is not a string")
    if any(not c.isprintable() for c in path):
        raise UnsafePathError(f"file path {path[:80]!r} is refused: it holds a control character")
    if len(path) > MAX_PATH_LENGTH:
        raise UnsafePathError(f"file path {path[:40]!r}... is longer than {MAX_PATH_LENGTH} characters")
    segments = path.split("/")
    if len(segments) > MAX_PATH_DEPTH:
        raise UnsafePathError(f"file path {path!r} is more than {MAX_PATH_DEPTH} folders deep")
    for segment in segments:
        if segment in ("", ".", "..") or not _SEGMENT_RE.fullmatch(segment):
            raise UnsafePathError(
                f"file path {path!r} is refused: each part must be letters, digits or '_.+=@-' and not start "
                "with '.' or '-' (no '..', absolute paths, backslashes or empty parts)"
            )
    return path


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    size: int = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_relative_path(value)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        value = value.lower()
        if not SHA256_RE.fullmatch(value):
            raise ValueError("must be 64 lowercase hex characters")
        return value


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stub: str
    files: list[ManifestFile] = Field(min_length=1)

    @field_validator("stub")
    @classmethod
    def _stub(cls, value: str) -> str:
        return str(parse_stub(value))

    @field_validator("files")
    @classmethod
    def _unique(cls, files: list[ManifestFile]) -> list[ManifestFile]:
        seen: set[str] = set()
        for item in files:
            if item.path in seen:
                raise ValueError(f"file path {item.path!r} is listed twice")
            seen.add(item.path)
        return files


def sparsezoo_file_type(path: str, training_has_nlp_trio: bool) -> str | None:
    """The SparseZoo v2 ``fileType`` the sparsezoo 1.8.1 client expects for a hub file, or None for
    files the client should not see (it only handles flat folders). The client builds
    ``deployment/`` itself from the top-level ``model.onnx`` and, when ``training/`` has them,
    from training's config.json / tokenizer.json / tokenizer_config.json (asserting each exists
    once), so those are left out of the deployment listing."""
    parts = path.split("/")
    if len(parts) == 1:
        name = parts[0]
        if name == "model.onnx":
            return None  # deployment/model.onnx is listed as the model's ONNX file
        if name == "model.md":
            return "card"
        if name.startswith("recipe") and name.endswith(".md"):
            return "recipe"
        return None
    if len(parts) == 2 and parts[0] == "training":
        return "training"
    if len(parts) == 2 and parts[0] == "deployment":
        if parts[1] == "model.onnx":
            # listed as the top-level "model.onnx" (type onnx); the client copies it into deployment/
            return "onnx"
        if training_has_nlp_trio and parts[1] in NLP_TRIO:
            return None
        return "deployment"
    return None


NLP_TRIO = ("config.json", "tokenizer.json", "tokenizer_config.json")
