"""The deployment-folder contract (``obert_modifiers.deployment``): the ``export.json`` schema read
and written in one place, folder kinds, hashing, and the one staging helper ("build beside,
rename into place, restore on failure"). Pure Python: no torch, no hub, no model."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from obert_modifiers import deployment
from obert_modifiers.deployment import (
    FORMAT_VERSION,
    MANIFEST,
    DeploymentError,
    DeploymentManifest,
    atomic_write_text,
    folder_kind,
    max_sequence_length,
    sha256_file,
    split_folders,
    staged_dir,
)
from obert_modifiers.errors import ObertError

FIELDS = {
    "task": "text-classification",
    "sequence_length": 64,
    "opset": 14,
    "quantized": True,
    "int8_format": "integer",
    "num_layers": 4,
    "num_parameters": 1014178,
    "sparsity": {"overall": 0.48, "per_layer": {"bert.encoder.layer.0.output.dense.weight": 0.5}},
    "parity": {"max_abs_diff": 0.012, "tolerance": 0.1, "num_samples": 12, "prediction_agreement": 1.0},
    "onnx_bytes": 1234,
    "onnx_sha256": "0" * 64,
    "source_model": "/models/tiny",
    "recipe": "recipe.yaml",
}


def _write_json(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps(data))
    return folder


def _unwritable_dir(tmp_path: Path) -> Path:
    """A folder nobody can create entries in: a read-only one for a normal user; /sys as root
    (root ignores permission bits, but not /sys's refusal)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (locked / "probe").mkdir()
    except OSError:
        return locked
    (locked / "probe").rmdir()
    if Path("/sys").is_dir():
        try:
            os.mkdir("/sys/obert-probe")
        except OSError:
            return Path("/sys")
    pytest.skip("no folder here refuses writes (root without /sys)")


# ------------------------------------------------------------------------------------------------
# export.json


def test_manifest_round_trip_keeps_every_field(tmp_path):
    manifest = DeploymentManifest.create(**FIELDS)
    path = manifest.write(tmp_path)
    assert path == tmp_path / MANIFEST
    data = json.loads(path.read_text())
    assert data["format_version"] == FORMAT_VERSION == 1
    assert {k: data[k] for k in FIELDS} == FIELDS
    assert data["created"]  # stamped on creation
    again = DeploymentManifest.read(tmp_path)
    assert again == manifest
    assert DeploymentManifest.read(path) == manifest  # the file itself works too
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]  # no temporary file left


def test_unknown_keys_from_a_newer_writer_are_kept(tmp_path):
    _write_json(tmp_path, {**FIELDS, "calibration": {"samples": 8}})
    manifest = DeploymentManifest.read(tmp_path)
    assert manifest.model_dump()["calibration"] == {"samples": 8}


def test_a_newer_format_version_is_refused_with_upgrade_advice(tmp_path):
    _write_json(tmp_path, {**FIELDS, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(DeploymentError, match=r"format_version 2 is newer.*upgrade obert-modifiers"):
        DeploymentManifest.read(tmp_path)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"sequence_length": None}, "sequence_length"),
        ({"sparsity": {"overall": 1.5, "per_layer": {}}}, "sparsity.overall"),
        ({"parity": {**FIELDS["parity"], "num_samples": 0}}, "parity.num_samples"),
        ({"onnx_sha256": "not-a-digest"}, "onnx_sha256"),
    ],
    ids=["missing", "out-of-range", "nested", "pattern"],
)
def test_a_bad_manifest_names_the_field(tmp_path, change, fragment):
    data = {**FIELDS, **change}
    data = {k: v for k, v in data.items() if v is not None}
    _write_json(tmp_path, data)
    with pytest.raises(DeploymentError) as error:
        DeploymentManifest.read(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / MANIFEST}: not a deployment manifest: ")
    assert fragment in message and "\n" not in message
    with pytest.raises(DeploymentError, match="export.json would be invalid: " + fragment.split(".")[0]):
        DeploymentManifest.create(**data)


def test_unreadable_or_missing_manifests_are_one_line_errors(tmp_path):
    with pytest.raises(DeploymentError, match="not a finished deployment folder .*obert export"):
        DeploymentManifest.read(tmp_path)
    (tmp_path / MANIFEST).write_text("{truncated")
    with pytest.raises(DeploymentError, match="cannot read the deployment manifest"):
        DeploymentManifest.read(tmp_path)
    (tmp_path / MANIFEST).write_text("[1, 2]")
    with pytest.raises(DeploymentError, match="expected a JSON object"):
        DeploymentManifest.read(tmp_path)
    assert issubclass(DeploymentError, ObertError)


# ------------------------------------------------------------------------------------------------
# folder kinds, hashing, the model's length limit


def test_folder_kind_and_split_folders(tmp_path):
    deployment_dir = tmp_path / "dep"
    deployment_dir.mkdir()
    (deployment_dir / "model.onnx").write_bytes(b"onnx")
    training = tmp_path / "train"
    training.mkdir()
    (training / "config.json").write_text("{}")
    zoo = tmp_path / "zoo"
    (zoo / "deployment").mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()

    assert folder_kind(deployment_dir) == "deployment"
    assert folder_kind(training) == "training"
    assert folder_kind(zoo) == "zoo"
    assert split_folders(deployment_dir) == (deployment_dir, None)
    assert split_folders(training) == (None, training)
    assert split_folders(zoo) == (zoo / "deployment", None)
    with pytest.raises(DeploymentError, match="not a model folder"):
        folder_kind(empty)
    with pytest.raises(DeploymentError, match="no such folder"):
        folder_kind(tmp_path / "nope")


def test_sha256_file_is_the_plain_digest(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * deployment.CHUNK + 17))  # more than one chunk
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_max_sequence_length_reads_the_position_embeddings(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 64}))
    assert max_sequence_length(tmp_path) == 64
    # RoBERTa's position ids start after the padding index: 514 positions take 512 tokens
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1})
    )
    assert max_sequence_length(tmp_path) == 512
    (tmp_path / "config.json").write_text("{}")
    assert max_sequence_length(tmp_path) is None
    assert max_sequence_length(tmp_path / "nope") is None


def test_atomic_write_text_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("old")
    path.chmod(0o600)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------------------
# staged_dir


def test_staged_dir_puts_a_finished_folder_in_place(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with staged_dir(out) as staging:
        assert staging.parent == out.parent and not out.exists()
        (staging / "file.txt").write_text("done")
    assert (out / "file.txt").read_text() == "done"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no staging folder left


def test_a_failure_keeps_the_old_folder_and_leaves_no_staging(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half way"):
        with staged_dir(out, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("half way")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_on_a_new_target_leaves_nothing_not_even_its_parents(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out) as staging:
            (staging / "part.txt").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("stale")
    with staged_dir(out, overwrite=True) as staging:
        (staging / "fresh.txt").write_text("fresh")
    assert sorted(p.name for p in out.iterdir()) == ["fresh.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the moved-aside copy is gone


def test_without_overwrite_an_existing_or_appearing_folder_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(DeploymentError, match=r"already exists; pass overwrite=True \(--overwrite\)"):
        with staged_dir(out):
            pytest.fail("the block must not run")
    assert (out / "mine.txt").read_text() == "mine"

    later = tmp_path / "later"
    with pytest.raises(DeploymentError, match="appeared while it was being written"):
        with staged_dir(later) as staging:
            (staging / "ours.txt").write_text("ours")
            later.mkdir()  # another process got there first
            (later / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in later.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["later", "out"]


def test_an_unwritable_place_is_a_one_line_error(tmp_path):
    locked = _unwritable_dir(tmp_path)
    out = locked / "obert-out"
    with pytest.raises(DeploymentError) as error:
        with staged_dir(out):
            pytest.fail("the block must not run")
    message = str(error.value)
    assert message.startswith(f"cannot write {out}: ") and "choose a folder you can write to" in message
    assert not out.exists()

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DeploymentError, match=f"{blocker} is a file, not a folder"):
        with staged_dir(blocker / "out"):
            pytest.fail("the block must not run")


def test_the_contract_module_imports_neither_torch_nor_the_hub():
    code = (
        "import sys\n"
        "import obert_modifiers.deployment\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'httpx', 'fastapi')"
        " or m.startswith('obert_modifiers.zoo'))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
