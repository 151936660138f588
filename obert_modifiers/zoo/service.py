"""The hub's logic, apart from HTTP: publish (atomic swap of a model row and its file rows after
the blobs are in place), search, resolve, delete, and the clean-up of what killed uploads leave."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError, OperationalError

from obert_modifiers.errors import ObertError
from obert_modifiers.zoo.card import ModelCard
from obert_modifiers.zoo.db import Database, File, Model
from obert_modifiers.zoo.protocol import NLP_TRIO, Manifest, sparsezoo_file_type
from obert_modifiers.zoo.store import BlobStore
from obert_modifiers.zoo.stubs import Stub, parse_stub

_LOGGER = logging.getLogger("obert_modifiers.zoo")
MODEL_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # applied with fullmatch; ids are uuid4 hex
SEARCH_FIELDS = ("domain", "sub_domain", "task", "architecture", "dataset", "sparse_tag", "framework", "repo")


class HubError(ObertError):
    """An error with an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Limits:
    max_file_bytes: int = 4 * 1024**3
    max_upload_bytes: int = 8 * 1024**3
    max_files: int = 2000
    gc_grace_seconds: float = 300.0


class Hub:
    def __init__(self, db: Database, store: BlobStore, limits: Limits | None = None) -> None:
        self.db = db
        self.store = store
        self.limits = limits or Limits()
        # publish commits and blob garbage collection never interleave within one process
        self._commit_lock = threading.Lock()

    # ------------------------------------------------------------------ maintenance

    def cleanup(self) -> dict[str, int]:
        """Remove staging folders of dead uploads and unreferenced blobs (older than the grace)."""
        staged = self.store.clean_staging()
        blobs = self.collect_garbage()
        if staged or blobs:
            _LOGGER.info("cleanup: removed %d dead uploads, %d unreferenced blobs", len(staged), blobs)
        return {"staging": len(staged), "blobs": blobs}

    def collect_garbage(self, candidates: set[str] | None = None) -> int:
        with self._commit_lock:
            with self.db.session() as session:
                referenced = set(session.scalars(select(File.sha256).distinct()))
            now = time.time()
            removed = 0
            for sha, mtime in list(self.store.iter_blobs()):
                if candidates is not None and sha not in candidates:
                    continue
                if sha in referenced:
                    continue
                if candidates is None and now - mtime < self.limits.gc_grace_seconds:
                    continue
                self.store.delete(sha)
                removed += 1
            return removed

    # ------------------------------------------------------------------ checks

    def check_manifest(self, manifest: Manifest, owner: str) -> None:
        if len(manifest.files) > self.limits.max_files:
            raise HubError(413, f"too many files: {len(manifest.files)} > {self.limits.max_files}")
        total = 0
        for item in manifest.files:
            if item.size > self.limits.max_file_bytes:
                raise HubError(
                    413,
                    f"file {item.path} is {item.size} bytes, over the hub's per-file limit of "
                    f"{self.limits.max_file_bytes} bytes",
                )
            total += item.size
        if total > self.limits.max_upload_bytes:
            raise HubError(
                413, f"upload is {total} bytes, over the hub's limit of {self.limits.max_upload_bytes}"
            )
        paths = {item.path for item in manifest.files}
        missing = [p for p in ("model.md", "deployment/model.onnx") if p not in paths]
        if missing:
            raise HubError(422, f"publish of {manifest.stub} refused: missing required file(s) {missing}")
        with self.db.session() as session:
            existing = session.scalar(select(Model).where(Model.stub == manifest.stub))
            if existing is not None and existing.owner != owner:
                raise HubError(
                    403, f"{manifest.stub} belongs to {existing.owner!r}; only its owner can replace it"
                )

    @staticmethod
    def check_card(card: ModelCard, stub: str) -> None:
        parsed = parse_stub(stub).fields()
        card_fields = card.stub_fields()
        for key, value in parsed.items():
            theirs = card_fields.get(key)
            if theirs is not None and value is not None and theirs != value:
                raise HubError(
                    422, f"model card refused: field '{key}' is {theirs!r} but the stub {stub} says {value!r}"
                )
        if card.stub is not None and card.stub != stub:
            raise HubError(422, f"model card refused: field 'stub' is {card.stub!r}, publishing as {stub}")

    # ------------------------------------------------------------------ publish

    def commit(
        self, manifest: Manifest, owner: str, staged: dict[str, Path], card: ModelCard, card_body: str
    ) -> Model:
        """Move the verified blobs in, then swap the model rows in one transaction."""
        stub = parse_stub(manifest.stub)
        replaced: set[str] = set()
        created: set[str] = set()  # blobs this publish brought into the store
        try:
            with self._commit_lock:
                for sha, path in staged.items():
                    if not self.store.has(sha):
                        created.add(sha)
                    self.store.put(sha, path)
                for item in manifest.files:
                    if not self.store.has(item.sha256):
                        raise HubError(400, f"file {item.path}: its content was not uploaded")
                model, replaced = self._swap_rows(manifest, stub, owner, card, card_body)
        except BaseException as error:
            # refused at commit (another owner took the stub meanwhile, the database gave up...):
            # the blobs it brought in are referenced by nothing, so they go now, not at the next start
            removed = self.collect_garbage(candidates=created) if created else 0
            reason = error.message if isinstance(error, HubError) else type(error).__name__
            _LOGGER.info(
                "publish of %s by %s refused at commit (%s): removed %d staged blobs",
                manifest.stub,
                owner,
                reason,
                removed,
            )
            raise
        if replaced:
            self.collect_garbage(candidates=replaced)
        return model

    def _swap_rows(
        self, manifest: Manifest, stub: Stub, owner: str, card: ModelCard, card_body: str
    ) -> tuple[Model, set[str]]:
        """Replace the model at the stub (if ``owner`` owns it) in one transaction, retried while the
        database is busy; returns the new model and the sha256 of the files of the one it replaced."""
        files = list(manifest.files)
        replaced: set[str] = set()
        for attempt in range(8):
            try:
                with self.db.session.begin() as session:
                    old = session.scalar(select(Model).where(Model.stub == manifest.stub))
                    if old is not None:
                        if old.owner != owner:
                            raise HubError(403, f"{manifest.stub} belongs to {old.owner!r}")
                        replaced = {f.sha256 for f in old.files}
                        session.delete(old)
                        session.flush()
                    card_data = card.model_dump(mode="json", exclude_none=True)
                    model = Model(
                        id=uuid.uuid4().hex,
                        stub=manifest.stub,
                        owner=owner,
                        domain=stub.domain,
                        sub_domain=stub.sub_domain,
                        architecture=stub.architecture,
                        sub_architecture=stub.sub_architecture,
                        framework=stub.framework,
                        repo=stub.repo,
                        dataset=stub.dataset,
                        training_scheme=stub.training_scheme,
                        sparse_tag=stub.sparse_tag,
                        task=card.task,
                        card_json=json.dumps(card_data),
                        card_body=card_body,
                        search_text=" ".join(
                            [
                                manifest.stub,
                                card.display_name or "",
                                card.description or "",
                                card.base_model or "",
                                card.task,
                                card_body,
                            ]
                        ).lower(),
                        total_bytes=sum(f.size for f in files),
                    )
                    model.files = [File(path=f.path, sha256=f.sha256, size=f.size) for f in files]
                    session.add(model)
                return model, replaced
            except (IntegrityError, OperationalError):
                if attempt == 7:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ reads

    def search(
        self, filters: dict[str, str | None], text: str | None, limit: int, offset: int
    ) -> tuple[int, list[Model]]:
        for key, value in (*filters.items(), ("q", text)):
            if value and any(not c.isprintable() for c in value):
                raise HubError(422, f"search refused: {key} {value[:80]!r} holds a control character")
        query = select(Model)
        for key, value in filters.items():
            if not value:
                continue
            if key == "task":  # "text-classification" or its stub form "text_classification"
                query = query.where(or_(Model.task == value, Model.sub_domain == value.replace("-", "_")))
            else:
                query = query.where(getattr(Model, key) == value)
        if text:
            for word in text.lower().split()[:8]:
                escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                query = query.where(Model.search_text.like(f"%{escaped}%", escape="\\"))
        with self.db.session() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = list(session.scalars(query.order_by(Model.created.desc()).limit(limit).offset(offset)))
        return total, rows

    def get(self, model_id: str) -> Model:
        if not MODEL_ID_RE.fullmatch(model_id):
            raise HubError(404, f"no model with id {model_id[:80]!r} on this hub")
        with self.db.session() as session:
            model = session.get(Model, model_id)
        if model is None:
            raise HubError(404, f"no model with id {model_id!r} on this hub")
        return model

    def resolve(self, stub: str) -> Model:
        canonical = str(parse_stub(stub))
        with self.db.session() as session:
            model = session.scalar(select(Model).where(Model.stub == canonical))
        if model is None:
            raise HubError(404, f"unknown stub {canonical}: no model is published under it on this hub")
        return model

    def delete(self, model_id: str, owner: str) -> Model:
        if not MODEL_ID_RE.fullmatch(model_id):
            raise HubError(404, f"no model with id {model_id[:80]!r} on this hub")
        with self._commit_lock:
            with self.db.session.begin() as session:
                model = session.get(Model, model_id)
                if model is None:
                    raise HubError(404, f"no model with id {model_id!r} on this hub")
                if model.owner != owner:
                    raise HubError(
                        403, f"{model.stub} belongs to {model.owner!r}; only its owner can delete it"
                    )
                shas = {f.sha256 for f in model.files}
                session.delete(model)
        self.collect_garbage(candidates=shas)
        return model


def file_type_map(model: Model) -> dict[str, str | None]:
    names = {f.path for f in model.files}
    trio = all(f"training/{n}" in names for n in NLP_TRIO)
    return {f.path: sparsezoo_file_type(f.path, trio) for f in model.files}


def model_summary(model: Model, base_url: str) -> dict[str, Any]:
    card = json.loads(model.card_json)
    return {
        "id": model.id,
        "stub": model.stub,
        "domain": model.domain,
        "sub_domain": model.sub_domain,
        "task": model.task,
        "architecture": model.architecture,
        "sub_architecture": model.sub_architecture,
        "framework": model.framework,
        "repo": model.repo,
        "dataset": model.dataset,
        "sparse_tag": model.sparse_tag,
        "owner": model.owner,
        "created": model.created.isoformat() if model.created else None,
        "total_bytes": model.total_bytes,
        "display_name": card.get("display_name"),
        "sparsity": (card.get("sparsity") or {}).get("overall"),
        "quantized": card.get("quantized"),
        "url": f"{base_url}/api/v1/models/{model.id}",
    }


def file_url(base_url: str, model: Model, path: str) -> str:
    return f"{base_url}/api/v1/models/{model.id}/files/{path}"


def model_detail(model: Model, base_url: str) -> dict[str, Any]:
    data = model_summary(model, base_url)
    data["card"] = json.loads(model.card_json)
    data["files"] = [
        {"path": f.path, "size": f.size, "sha256": f.sha256, "url": file_url(base_url, model, f.path)}
        for f in model.files
    ]
    return data
