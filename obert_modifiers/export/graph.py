"""The ONNX graph: export a loaded model (FP32, or QAT as INT8 in one of :data:`INT8_FORMATS`),
fold fake-quantized embedding tables, rewrite QDQ into ORT's integer GEMM form, and measure the
sparsity an ONNX file keeps."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from obert_modifiers.export.errors import OPSET, ExportError
from obert_modifiers.export.parity import SAMPLE_TEXTS, _input_names

# INT8 forms of a QAT model, fastest on ONNX Runtime first (docs/export.md, docs/results.md):
#   ort      QDQ activations, weights stored as INT8 -> DequantizeLinear -> MatMul, which ORT fuses
#            into MatMulIntegerToFloat; exact only where ORT's u8s8 kernel is (VNNI)
#   ort-u8   the same with the weights on the UINT8 grid (zero point 128): exact on any x86 CPU
#   integer  SparseML's conversion (MatMulInteger with UINT8 weights, INT32 bias): DeepSparse's INT8 path
#   qdq      QuantizeLinear/DequantizeLinear pairs left for the runtime to fuse
INT8_FORMATS = ("ort", "ort-u8", "integer", "qdq")


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
    ``int8_format="integer"``, kept as ``QuantizeLinear``/``DequantizeLinear`` pairs with ``"qdq"``,
    or rewritten from those pairs into ORT's integer GEMM form with ``"ort"``/``"ort-u8"``
    (:func:`qdq_to_ort_int8`). Every form but ``integer`` has its embedding tables folded."""
    if quantized and int8_format not in INT8_FORMATS:
        raise ValueError(f"int8_format must be one of {', '.join(INT8_FORMATS)}, not {int8_format!r}")
    if not sparseml_installed():
        if quantized and int8_format == "integer":
            raise ExportError(
                "INT8 format 'integer' is SparseML's MatMulInteger conversion: it needs the SparseML stack "
                "(make venv); on this stack use ort, ort-u8 or qdq (or auto)"
            )
        _export_native(model, tokenizer, onnx_path, sequence_length, opset)
        _int8_post_process(onnx_path, quantized, int8_format)
        return
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
    _int8_post_process(onnx_path, quantized, int8_format)


def _int8_post_process(onnx_path: Path, quantized: bool, int8_format: str) -> None:
    if quantized and int8_format in ("ort", "ort-u8"):
        qdq_to_ort_int8(onnx_path, weights="u8" if int8_format == "ort-u8" else "s8", layout="qdq")
    elif quantized and int8_format == "qdq":
        fold_embedding_qdq(onnx_path)


def sparseml_installed() -> bool:
    """Whether SparseML's exporter is there (the SparseML stack); else the native export runs."""
    import importlib.util

    try:
        return importlib.util.find_spec("sparseml") is not None
    except (ImportError, ValueError):
        return False


def int8_formats() -> tuple[str, ...]:
    """The INT8 forms this stack can write: ``integer`` needs SparseML's conversion."""
    return INT8_FORMATS if sparseml_installed() else tuple(f for f in INT8_FORMATS if f != "integer")


def _export_native(model, tokenizer, onnx_path: Path, sequence_length: int, opset: int) -> None:
    """The export SparseML's ``export_onnx(convert_qat=False)`` does, without SparseML: a copy of the
    model with its observers off, TorchScript ``torch.onnx.export`` (not dynamo: single file, IR <= 9,
    QDQ straight from the fake-quant modules), dynamic batch and sequence axes, the outputs named
    after the model's output keys, then identity initializers folded and ``(1,)``-shaped
    quantization parameters flattened to scalars (the graph SparseML's passes leave)."""
    import copy

    import onnx
    import torch
    from onnx import numpy_helper

    input_names = _input_names(model, tokenizer)
    encoded = tokenizer(
        list(SAMPLE_TEXTS[:2]), padding="max_length", truncation=True, max_length=sequence_length,
        return_tensors="pt",
    )  # fmt: skip
    sample = tuple(encoded[name].to(torch.int64) for name in input_names)
    module = copy.deepcopy(model).cpu().eval()
    for submodule in module.modules():
        if hasattr(submodule, "observer_enabled"):
            submodule.observer_enabled[0] = 0
    with torch.no_grad():
        out = module(**dict(zip(input_names, sample, strict=True)))
    output_names = list(out.keys()) if hasattr(out, "keys") else ["output"]
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes.update({name: {0: "batch"} for name in output_names})
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module, sample, str(onnx_path), input_names=input_names, output_names=output_names,
        dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
    )  # fmt: skip
    graph = onnx.load(str(onnx_path))
    initializers = {init.name for init in graph.graph.initializer}
    identities = [
        node
        for node in graph.graph.node
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in initializers
    ]
    for node in identities:
        for other in graph.graph.node:
            for i, name in enumerate(other.input):
                if name == node.output[0]:
                    other.input[i] = node.input[0]
        graph.graph.node.remove(node)
    flatten = set()
    by_name = {init.name: init for init in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in by_name:
            if list(by_name[node.input[1]].dims) == [1]:
                flatten.update(node.input[1:3])
    for init in graph.graph.initializer:
        if init.name in flatten:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).reshape(()), name=init.name))
    onnx.save(graph, str(onnx_path))


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




def _constant_value(graph, name: str):
    """The array of an initializer or ``Constant`` output named ``name``, else None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _remove_dead_nodes(graph) -> None:
    """Drop nodes whose outputs nothing reads (and initializers no node reads)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _gather_quantized_tables(graph, producers) -> int:
    """``Gather(DequantizeLinear(QuantizeLinear(table)), ids)`` -> ``DequantizeLinear(Gather(q_table,
    ids))`` with the table stored quantized (per-tensor scale and zero point only); the rest is left
    to :func:`fold_embedding_qdq`. Returns the tables rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rewritten = 0
    for dequantize in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        users = consumers.get(dequantize.output[0], [])
        if not users or any(u.op_type != "Gather" or u.input[0] != dequantize.output[0] for u in users):
            continue
        quantize = producers.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear" or len(quantize.input) < 3:
            continue
        table, scale, zero = (_constant_value(graph, name) for name in quantize.input[:3])
        if table is None or scale is None or zero is None or scale.size != 1 or zero.size != 1:
            continue
        limits = np.iinfo(zero.dtype)
        q_table = np.clip(np.rint(table / scale.reshape(())) + int(zero.reshape(())), limits.min, limits.max)
        name = f"{dequantize.output[0]}_quantized_table"
        graph.initializer.extend(
            [
                numpy_helper.from_array(q_table.astype(zero.dtype), name),
                numpy_helper.from_array(scale.astype(np.float32).reshape(()), f"{name}_scale"),
                numpy_helper.from_array(zero.reshape(()), f"{name}_zero_point"),
            ]
        )
        for gather in users:
            position = list(graph.node).index(gather)
            gathered = f"{gather.output[0]}_quantized"
            new_gather = helper.make_node(
                "Gather", [name, gather.input[1]], [gathered], name=f"{gather.name}_quantized",
                axis=next((a.i for a in gather.attribute if a.name == "axis"), 0),
            )
            new_dequantize = helper.make_node(
                "DequantizeLinear", [gathered, f"{name}_scale", f"{name}_zero_point"], list(gather.output),
                name=f"{gather.name}_DequantizeLinear",
            )
            graph.node.remove(gather)
            graph.node.insert(position, new_dequantize)
            graph.node.insert(position, new_gather)
        rewritten += 1
    return rewritten


def qdq_to_ort_int8(
    onnx_path: str | os.PathLike, activations: str = "u8", weights: str = "s8", layout: str = "integer"
) -> int:
    """Rewrite a QAT model's QDQ graph, in place, into ORT's integer GEMM form, with the QAT
    model's own scales and zero points (nothing re-calibrated): every ``MatMul`` of a fake-quantized
    activation ``DequantizeLinear(QuantizeLinear(x, s_x, z_x))`` by a fake-quantized constant weight
    ``[Transpose](DequantizeLinear(QuantizeLinear(W, s_w, 0)))`` becomes ``MatMulInteger`` (INT8
    weights, per-tensor or per-output-channel as trained) -> ``Cast`` -> ``Mul`` by ``Mul(s_x, s_w)``,
    the pattern ORT fuses into ``MatMulIntegerToFloat``. Biases stay float ``Add`` nodes (baked on
    the INT32 grid by the exporter). ``layout="qdq"`` (what export writes) instead stores the INT8
    (or UINT8) weights and keeps ``DequantizeLinear -> MatMul``: ORT fuses that into
    ``MatMulIntegerToFloat``, while it constant-folds the static scale product of the integer layout
    and leaves its ``MatMulInteger -> Cast -> Mul -> Add`` unfused. Fake-quantized embedding tables
    are stored as UINT8 and gathered before they are dequantized (``Gather`` -> ``DequantizeLinear``:
    the same values, a quarter of the bytes). ``activations="s8"`` quantizes activations to INT8 (zero point
    ``z_x - 128``, the same values) for S8S8 kernels. Pruned weights stay exactly zero and shapes
    are unchanged. Attention matmuls (two activations) stay QDQ. Returns the MatMuls rewritten."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if activations not in ("u8", "s8") or weights not in ("u8", "s8"):
        raise ValueError(f"activations and weights must be 'u8' or 's8', not {activations!r}/{weights!r}")
    model = onnx.load(str(onnx_path))
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}

    def produced(name: str, op_type: str):
        node = producers.get(name)
        return node if node is not None and node.op_type == op_type else None

    def weight_of(name: str):
        """(INT8 weight laid out [K, N], per-N or scalar scale) of a fake-quantized constant."""
        transpose = produced(name, "Transpose")
        if transpose is not None:
            perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
            if perm != [1, 0]:
                return None
            name = transpose.input[0]
        dequantize = produced(name, "DequantizeLinear")
        quantize = produced(dequantize.input[0], "QuantizeLinear") if dequantize is not None else None
        if quantize is None or len(quantize.input) < 3:
            return None
        table, scale, zero = (_constant_value(graph, n) for n in quantize.input[:3])
        if table is None or scale is None or zero is None or table.ndim != 2 or np.any(zero != 0):
            return None
        if zero.dtype != np.int8:
            return None
        axis = next((a.i for a in quantize.attribute if a.name == "axis"), 1)
        scale = scale.astype(np.float32)
        if scale.size > 1:  # per channel along ``axis``
            shape = [1, 1]
            shape[axis] = -1
            grid = scale.reshape(shape)
        else:
            grid = scale.reshape(())
        q = np.clip(np.rint(table / grid), -128, 127).astype(np.int8)
        if transpose is not None:
            q, axis = q.T, 1 - axis
        if scale.size > 1 and axis != 1:  # the scale must run along the output columns N
            return None
        return np.ascontiguousarray(q), scale.reshape(-1) if scale.size > 1 else scale.reshape(())

    _gather_quantized_tables(graph, producers)
    producers = {output: node for node in graph.node for output in node.output}
    count = 0
    replaced: list[tuple] = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = weight_of(node.input[1])
        dequantize = produced(node.input[0], "DequantizeLinear")
        if weight is None or dequantize is None or len(dequantize.input) < 3:
            continue
        x_scale = _constant_value(graph, dequantize.input[1])
        x_zero = _constant_value(graph, dequantize.input[2])
        quantize = produced(dequantize.input[0], "QuantizeLinear")
        if x_scale is None or x_zero is None or x_scale.size != 1 or quantize is None:
            continue
        replaced.append((node, weight, dequantize, quantize, x_scale, x_zero))

    s8_inputs: dict[str, str] = {}
    for node, (q_weight, w_scale), dequantize, quantize, x_scale, x_zero in replaced:
        prefix = f"{node.name or node.output[0]}_int8"
        x_q = dequantize.input[0]
        new_nodes = []
        if layout == "qdq":  # stored INT8/UINT8 weights -> DequantizeLinear -> the same MatMul
            zero = np.zeros(w_scale.shape, dtype=np.int8)
            stored = q_weight
            if weights == "u8":
                stored = (q_weight.astype(np.int16) + 128).astype(np.uint8)
                zero = np.full(w_scale.shape, 128, dtype=np.uint8)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(stored, f"{prefix}_weight"),
                    numpy_helper.from_array(w_scale.astype(np.float32), f"{prefix}_weight_scale"),
                    numpy_helper.from_array(zero, f"{prefix}_weight_zero_point"),
                ]
            )
            extra = {"axis": 1} if w_scale.size > 1 else {}
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{prefix}_weight", f"{prefix}_weight_scale", f"{prefix}_weight_zero_point"],
                    [f"{prefix}_weight_float"],
                    name=f"{prefix}_DequantizeLinear",
                    **extra,
                )
            )
            node.input[1] = f"{prefix}_weight_float"
            position = list(graph.node).index(node)
            graph.node.insert(position, new_nodes[0])
            count += 1
            continue
        if activations == "s8" and x_zero.dtype == np.uint8:
            if x_q not in s8_inputs:
                s8_inputs[x_q] = f"{x_q}_s8"
                zero_s8 = np.array(int(x_zero.reshape(())) - 128, dtype=np.int8)
                graph.initializer.append(numpy_helper.from_array(zero_s8, f"{x_q}_s8_zero_point"))
                new_nodes.append(
                    helper.make_node(
                        "QuantizeLinear",
                        [quantize.input[0], quantize.input[1], f"{x_q}_s8_zero_point"],
                        [s8_inputs[x_q]],
                        name=f"{x_q}_QuantizeLinearS8",
                    )
                )
            x_q, x_zero_name = s8_inputs[x_q], f"{x_q}_s8_zero_point"
        else:
            x_zero_name = dequantize.input[2]
        weight_zero = np.array(0, dtype=np.int8)
        if weights == "u8":  # the same values on the UINT8 grid, zero point 128
            q_weight = (q_weight.astype(np.int16) + 128).astype(np.uint8)
            weight_zero = np.array(128, dtype=np.uint8)
        graph.initializer.extend(
            [
                numpy_helper.from_array(q_weight, f"{prefix}_weight"),
                numpy_helper.from_array(weight_zero, f"{prefix}_weight_zero_point"),
                numpy_helper.from_array(x_scale.astype(np.float32).reshape(()), f"{prefix}_input_scale"),
                numpy_helper.from_array(w_scale.astype(np.float32), f"{prefix}_weight_scale"),
            ]
        )
        # the scale as Mul(input scale, weight scale): the pattern ORT's MatMulIntegerToFloat fusion matches
        new_nodes += [
            helper.make_node(
                "MatMulInteger",
                [x_q, f"{prefix}_weight", x_zero_name, f"{prefix}_weight_zero_point"],
                [f"{prefix}_int32"],
                name=f"{prefix}_MatMulInteger",
            ),
            helper.make_node(
                "Cast", [f"{prefix}_int32"], [f"{prefix}_float"], to=TensorProto.FLOAT, name=f"{prefix}_Cast"
            ),
            helper.make_node(
                "Mul", [f"{prefix}_input_scale", f"{prefix}_weight_scale"], [f"{prefix}_scale"],
                name=f"{prefix}_ScaleMul",
            ),
            helper.make_node(
                "Mul", [f"{prefix}_float", f"{prefix}_scale"], list(node.output), name=f"{prefix}_Mul"
            ),
        ]
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new_node in enumerate(new_nodes):
            graph.node.insert(position + offset, new_node)
        count += 1
    _remove_dead_nodes(graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))
    return count


def _constant_weight(node: Any, weights: dict[str, Any]) -> Any:
    """The FP32 2-D constant weight of a ``MatMul`` node (as an array), else ``None``: the MatMuls the
    INT8 proxies of the latency tables rewrite."""
    import numpy as np
    from onnx import numpy_helper

    weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
    array = numpy_helper.to_array(weight) if weight is not None else None
    return array if array is not None and array.ndim == 2 and array.dtype == np.float32 else None


def rewrite_dynamic_int8(path: str | os.PathLike) -> int:
    """Rewrite an FP32 graph, in place, into ORT's dynamic INT8 form, the INT8 proxy of the latency
    table (``obert_modifiers.latency``) and a reference row of ``benchmarks/ort_int8.py``: every
    ``MatMul`` by a constant 2-D weight becomes ``DynamicQuantizeLinear`` (activations, U8) ->
    ``MatMulInteger`` (weights S8, symmetric per-tensor) -> ``Cast`` -> ``Mul`` by the two scales,
    the pattern ``onnxruntime.quantization.quantize_dynamic`` writes and ORT fuses. Done here because
    that module needs ``ml_dtypes``, which the pinned stack lacks. Returns the MatMuls rewritten."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    nodes = []
    count = 0
    for node in graph.node:
        array = _constant_weight(node, weights)
        if array is None:
            nodes.append(node)
            continue
        count += 1
        x = node.input[0]
        if x not in quantized_inputs:
            names = (f"{x}_quant", f"{x}_scale", f"{x}_zero_point")
            quantize = helper.make_node("DynamicQuantizeLinear", [x], list(names), name=f"{x}_QuantizeLinear")
            nodes.append(quantize)
            quantized_inputs[x] = names
        x_q, x_scale, x_zero = quantized_inputs[x]
        scale = float(np.abs(array).max()) / 127.0 or 1.0
        prefix = f"{node.name or node.output[0]}_int8"
        q = np.clip(np.round(array / scale), -127, 127).astype(np.int8)
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{prefix}_weight"),
                numpy_helper.from_array(np.array(0, dtype=np.int8), f"{prefix}_weight_zero_point"),
                numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{prefix}_weight_scale"),
            ]
        )
        nodes += [
            helper.make_node(
                "MatMulInteger",
                [x_q, f"{prefix}_weight", x_zero, f"{prefix}_weight_zero_point"],
                [f"{prefix}_int32"],
                name=f"{prefix}_MatMulInteger",
            ),
            helper.make_node("Cast", [f"{prefix}_int32"], [f"{prefix}_float"], to=TensorProto.FLOAT,
                             name=f"{prefix}_Cast"),
            helper.make_node("Mul", [x_scale, f"{prefix}_weight_scale"], [f"{prefix}_scale"],
                             name=f"{prefix}_ScaleMul"),
            helper.make_node("Mul", [f"{prefix}_float", f"{prefix}_scale"], list(node.output),
                             name=f"{prefix}_OutputMul"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return count


def rewrite_static_int8(path: str | os.PathLike, activation_scale: float = 0.05) -> int:
    """Rewrite an FP32 graph, in place, into the static INT8 form ``obert export`` ships for QAT models
    (``ort-u8``): every ``MatMul`` by a constant 2-D weight gets fake-quantized operands (activations
    UINT8 with a fixed scale and zero point 128, weights INT8 symmetric per-tensor), then
    :func:`qdq_to_ort_int8` turns them into UINT8 weights behind ``DequantizeLinear``. The INT8 proxy
    of DeepSparse latency tables (``obert_modifiers.latency``): DeepSparse 1.8's compiler aborts the
    process on :func:`rewrite_dynamic_int8`'s ``DynamicQuantizeLinear`` graphs (measured). Times do
    not depend on the scale values. Returns the MatMuls rewritten."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(activation_scale, dtype=np.float32), "static_int8_x_scale"),
            numpy_helper.from_array(np.array(128, dtype=np.uint8), "static_int8_x_zero_point"),
        ]
    )
    fake: dict[str, str] = {}  # activation -> its fake-quantized name (shared by Q/K/V)
    nodes, count = [], 0
    for node in graph.node:
        array = _constant_weight(node, weights)
        if array is None:
            nodes.append(node)
            continue
        count += 1
        x = node.input[0]
        if x not in fake:
            fake[x] = f"{x}_static_dq"
            scale_zero = ["static_int8_x_scale", "static_int8_x_zero_point"]
            nodes += [
                helper.make_node("QuantizeLinear", [x, *scale_zero], [f"{x}_static_q"], name=f"{x}_static_Q"),
                helper.make_node("DequantizeLinear", [f"{x}_static_q", *scale_zero], [fake[x]],
                                 name=f"{x}_static_DQ"),
            ]  # fmt: skip
        prefix = f"{node.name or node.output[0]}_static"
        scale = float(np.abs(array).max()) / 127.0 or 1.0
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{prefix}_w_scale"),
                numpy_helper.from_array(np.array(0, dtype=np.int8), f"{prefix}_w_zero_point"),
            ]
        )
        w_args = [f"{prefix}_w_scale", f"{prefix}_w_zero_point"]
        nodes += [
            helper.make_node("QuantizeLinear", [node.input[1], *w_args], [f"{prefix}_wq"], name=f"{prefix}Q"),
            helper.make_node("DequantizeLinear", [f"{prefix}_wq", *w_args], [f"{prefix}_wdq"], name=prefix),
            helper.make_node("MatMul", [fake[x], f"{prefix}_wdq"], list(node.output), name=node.name),
        ]  # fmt: skip
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    rewritten = qdq_to_ort_int8(path, weights="u8", layout="qdq")
    if rewritten != count:
        raise ValueError(f"{path}: {count} MatMuls fake-quantized, {rewritten} rewritten to INT8")
    return count


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

