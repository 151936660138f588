"""Read weight tensors without torch: safetensors files, ONNX initializers, and ``pytorch_model.bin``
(the zip + pickle format of ``torch.save``, read with a restricted unpickler that only rebuilds
tensors as numpy arrays: nothing else in the pickle can be constructed)."""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from obert_modifiers.errors import ObertError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "QInt8Storage": np.int8,
    "QUInt8Storage": np.uint8,
    "QInt32Storage": np.int32,
}


class WeightsError(ObertError, ValueError):
    """A weights file that cannot be read."""


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


def _rebuild_tensor(storage, storage_offset, size, stride, *args):
    size, stride = tuple(size), tuple(stride)
    if not size:
        return storage[storage_offset : storage_offset + 1].reshape(())
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(s * itemsize for s in stride)
    )


def _rebuild_parameter(data, *args):
    return data


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in ("float32", "float16", "int64"):
            return name
        raise WeightsError(f"unsupported object {module}.{name} in the checkpoint pickle")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid[:5]
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise WeightsError(f"unsupported persistent id {pid!r}")
        raw = self.archive.read(f"{self.prefix}data/{key}")
        dtype = _STORAGE_DTYPES[storage_type.name]
        if dtype == "bfloat16":
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32)
        return np.frombuffer(raw, dtype=dtype)


def read_torch_zip(path: str | Path) -> dict[str, np.ndarray]:
    """The state dict of a zip-format ``torch.save`` file as numpy arrays."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise WeightsError(
            f"{path}: not a zip-format torch checkpoint (legacy format unsupported)"
        ) from error
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if not pickles:
            raise WeightsError(f"{path}: no data.pkl inside the checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as handle:
            state = _TorchUnpickler(handle, archive, prefix).load()
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: the checkpoint is not a state dict")
    return {str(k): np.asarray(v) for k, v in state.items() if isinstance(v, np.ndarray)}


def read_weights(folder: str | Path) -> dict[str, np.ndarray] | None:
    """The weights of a Hugging Face folder (safetensors, then pytorch_model.bin), or None."""
    folder = Path(folder)
    safetensors_file = folder / "model.safetensors"
    if safetensors_file.is_file():
        from safetensors.numpy import load_file

        return load_file(str(safetensors_file))
    bin_file = folder / "pytorch_model.bin"
    if bin_file.is_file():
        return read_torch_zip(bin_file)
    return None


def read_onnx_initializers(onnx_path: str | Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def layer_sparsity(weights: dict[str, np.ndarray]) -> tuple[float, dict[str, float]]:
    """(overall, per-layer) fraction of zeros over the 2-D weight matrices of the encoder layers
    (the ones pruning targets); falls back to every 2-D weight if no encoder layer is named."""
    targets = {
        name: w for name, w in weights.items() if w.ndim == 2 and "layer." in name and name.endswith("weight")
    }
    if not targets:
        targets = {
            name: w for name, w in weights.items() if w.ndim == 2 and np.issubdtype(w.dtype, np.floating)
        }
    per_layer = {name: float(np.mean(w == 0)) for name, w in targets.items()}
    total = sum(w.size for w in targets.values())
    zeros = sum(int(np.sum(w == 0)) for w in targets.values())
    return (zeros / total if total else 0.0), per_layer
