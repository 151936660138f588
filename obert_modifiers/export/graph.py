"""The ONNX graph: export a loaded model (FP32, or QAT as INT8 in SparseML's integer or QDQ
pattern), fold fake-quantized embedding tables, and measure the sparsity an ONNX file keeps."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from obert_modifiers.export.errors import OPSET
from obert_modifiers.export.parity import SAMPLE_TEXTS, _input_names


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
    ``int8_format="integer"``, or kept as ``QuantizeLinear``/``DequantizeLinear`` pairs with ``"qdq"``."""
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

