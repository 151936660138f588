"""Latency tables: measured on ONNX Runtime for a tiny shape, cached on disk by key (the second call reads
the file and times nothing), and the FLOPs table as the no-runtime alternative."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from obert_modifiers import latency
from obert_modifiers.algorithms.latency_search import LatencyTable
from obert_modifiers.errors import ObertError


def _config(**over):
    from transformers import BertConfig

    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    shape.update(over)
    return BertConfig(**shape)


def _tiny_fp32_graph(tmp_path):
    """A random one-layer BERT exported the table's way: (config, path, input ids, ORT's FP32 output)."""
    import onnxruntime as ort
    import torch
    from transformers import BertModel

    config = _config(vocab_size=100)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 16))
    path = tmp_path / "model.onnx"
    latency._export(model, {"input_ids": ids}, path)
    (fp32,) = ort.InferenceSession(str(path)).run(None, {"input_ids": ids.numpy()})[:1]
    return config, path, ids, fp32


FAST = dict(threads=1, sequence_length=16, ffn_step=64, rounds=1, runs=2, warmup=1, progress=False)


def test_measured_table_builds_caches_and_is_read_back(tmp_path):
    config = _config()
    table = latency.latency_table(config, cache_dir=tmp_path, **FAST)
    key = latency.shape_key(config, threads=1, sequence_length=16)
    path = latency.table_cache_path(key, tmp_path, 64)
    assert path.is_file()
    assert table.key == key and table.key.runtime == "onnxruntime" and table.key.cpu == latency.cpu_model()
    assert sorted(table.attention) == [0, 1, 2] and sorted(table.ffn) == [0, 64]
    assert table.attention[0] == 0.0 and table.ffn[0] == 0.0  # entries are increments over the stand-in
    assert table.base > 0 and table.meta["dense_measured"] > 0 and table.unit == "ms"
    assert LatencyTable.from_json(path.read_text()) == table

    stamp = path.stat().st_mtime_ns
    again = latency.latency_table(config, cache_dir=tmp_path, **FAST)
    assert again == table  # the very same floats: read from the file, not re-timed
    assert path.stat().st_mtime_ns == stamp

    fresh = latency.latency_table(config, cache_dir=tmp_path, refresh=True, **FAST)
    assert (fresh.base, fresh.meta["dense_measured"]) != (table.base, table.meta["dense_measured"])
    assert LatencyTable.from_json(path.read_text()) == fresh
    # another setting is another key and another file
    other = latency.shape_key(config, threads=2, sequence_length=16)
    assert latency.table_cache_path(other, tmp_path, 64) != path


def test_a_damaged_cache_file_is_reported_by_name(tmp_path):
    config = _config()
    key = latency.shape_key(config, threads=1, sequence_length=16)
    path = latency.table_cache_path(key, tmp_path, 64)
    path.write_text("{not json")
    with pytest.raises(latency.LatencyTableError, match=f"{path.name}: not JSON.*refresh=True") as info:
        latency.latency_table(config, cache_dir=tmp_path, **FAST)
    assert isinstance(info.value, ObertError)


def test_flops_table_is_monotone_in_width_and_counts_macs(tmp_path):
    minilm = _config(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    table = latency.latency_table(minilm, runtime="flops", cache_dir=tmp_path, sequence_length=128)
    assert list(tmp_path.iterdir()) == []  # nothing to cache
    assert table.unit == "MMAC" and table.key.runtime == "flops" and table.key.cpu == ""
    heads = [table.attention[k] for k in range(13)]
    widths = sorted(table.ffn)
    assert widths == list(range(0, 1537, 128))
    assert all(a < b for a, b in zip(heads, heads[1:], strict=False))
    assert all(table.ffn[a] < table.ffn[b] for a, b in zip(widths, widths[1:], strict=False))
    # one layer at seq 128: Q/K/V/out 4*128*384*384, attention matmuls 2*128*128*384, FFN 2*128*384*1536
    per_layer = (4 * 128 * 384 * 384 + 2 * 128 * 128 * 384 + 2 * 128 * 384 * 1536) / 1e6
    assert table.dense() == pytest.approx(table.base + 6 * per_layer)
    half = table.predict([6] * 6, [768] * 6)
    assert table.speedup([6] * 6, [768] * 6) == pytest.approx(table.dense() / half)
    json.loads(table.to_json())


def test_bad_settings_are_refused():
    with pytest.raises(latency.LatencyTableError, match="runtime must be one of"):
        latency.shape_key(_config(), runtime="tensorrt")
    with pytest.raises(latency.LatencyTableError, match="precision must be one of"):
        latency.shape_key(_config(), precision="int4")
    with pytest.raises(latency.LatencyTableError, match="not a BERT-shaped config"):
        latency.shape_key(object())
    flags = latency.cpu_flags()
    assert set(flags) >= {"avx2", "avx512_vnni"} and all(isinstance(v, bool) for v in flags.values())


def test_int8_graphs_are_ort_dynamic_int8_and_close_to_fp32(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    config, path, ids, fp32 = _tiny_fp32_graph(tmp_path)
    assert latency._quantize(path) == 6  # Q, K, V, out-projection, two FFN linears
    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert ops["MatMulInteger"] == 6 and ops["DynamicQuantizeLinear"] == 4  # Q/K/V share their input
    (int8,) = ort.InferenceSession(str(path)).run(None, {"input_ids": ids.numpy()})[:1]
    diff = np.abs(int8 - fp32)
    assert 0 < diff.mean() < 0.05, diff.mean()

    table = latency.latency_table(config, precision="int8", cache_dir=tmp_path, **FAST)
    assert table.key.precision == "int8" and table.meta["dense_measured"] > 0
    assert latency.table_cache_path(table.key, tmp_path, 64).is_file()


def test_static_int8_proxy_is_the_shipped_ort_u8_form_and_close_to_fp32(tmp_path):
    """DeepSparse tables' INT8 proxy: UINT8 weights behind ``DequantizeLinear`` and fake-quantized
    activations (what ``obert export`` writes as ``ort-u8``), close to the FP32 graph on ORT."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    _, path, ids, fp32 = _tiny_fp32_graph(tmp_path)
    assert latency._quantize_static(path) == 6
    graph = onnx.load(str(path)).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    matmuls = [node for node in graph.node if node.op_type == "MatMul"]
    producers = {out: node for node in graph.node for out in node.output}
    u8_weights = [
        m for m in matmuls
        if producers.get(m.input[1]) is not None and producers[m.input[1]].op_type == "DequantizeLinear"
        and weights.get(producers[m.input[1]].input[0], np.zeros(0)).dtype == np.uint8
    ]  # fmt: skip
    assert len(u8_weights) == 6 and not any(n.op_type == "DynamicQuantizeLinear" for n in graph.node)
    (int8,) = ort.InferenceSession(str(path)).run(None, {"input_ids": ids.numpy()})[:1]
    diff = np.abs(int8 - fp32)
    assert 0 < diff.mean() < 0.05, diff.mean()


def test_measured_tables_are_the_additive_fit_of_every_timed_model(tmp_path):
    """The table is the non-negative least-squares fit of the additive model to every timed graph: no
    entry falls as a block widens, a removed block costs 0, every timed model and the fit's residuals
    are kept, and the table predicts each timed model as the fit does."""
    config = _config(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    table = latency.latency_table(config, cache_dir=tmp_path, **{**FAST, "ffn_step": 32})
    for entries in (table.attention, table.ffn):
        values = [entries[k] for k in sorted(entries)]
        assert values == sorted(values) and values[0] == 0.0
    assert table.meta["method"] == latency.METHOD == "in-model-fit"
    timed = table.meta["models_ms"]
    graphs = {"dense", "base", *(f"attention_{k}" for k in range(4)), *(f"ffn_{n}" for n in (0, 32, 64, 96))}
    assert set(timed) == graphs
    fit = table.meta["fit"]
    assert table.attention[3] == pytest.approx(fit["attention"]["intercept"] + 3 * fit["attention"]["slope"])
    assert table.ffn[64] == pytest.approx(fit["ffn"]["intercept"] + 64 * fit["ffn"]["slope"])
    residuals = [timed[name] - table.predict(*latency._uniform_structure(table.key, name)) for name in timed]
    assert max(abs(r) for r in residuals) == pytest.approx(fit["max_abs_residual_ms"], abs=1e-3)
    assert table.meta["dense_predicted"] == pytest.approx(
        table.base + 2 * (table.attention[4] + table.ffn[128])
    )
    assert 0 <= table.base < table.meta["dense_measured"]
    # whether the blocks add up to the dense model is recorded, and a table that does not is not trusted
    ratio = table.meta["dense_predicted"] / table.meta["dense_measured"]
    assert table.meta["consistency"] == pytest.approx(ratio, rel=1e-3)
    assert table.meta["trusted"] is False or abs(ratio - 1) <= latency.MAX_MISMATCH


def test_deepsparse_tables_time_the_same_graphs_with_its_engine_or_say_it_is_missing(tmp_path):
    """``runtime="deepsparse"``: where DeepSparse is installed (the SparseML venv), the table is measured
    with ``deepsparse.Engine`` and keyed by its version; where it is not (the modern venv), the
    setting is refused by name before anything is exported."""
    from importlib.util import find_spec

    config = _config()
    if find_spec("deepsparse") is None:
        refused = "'deepsparse' is not installed.*onnxruntime or flops"
        with pytest.raises(latency.LatencyTableError, match=refused):
            latency.latency_table(config, runtime="deepsparse", cache_dir=tmp_path, **FAST)
        assert list(tmp_path.iterdir()) == []
        return
    from importlib.metadata import version

    for precision in ("fp32", "int8"):
        table = latency.latency_table(
            config, runtime="deepsparse", precision=precision, cache_dir=tmp_path, **FAST
        )
        assert table.key.runtime == "deepsparse" and table.key.runtime_version == version("deepsparse")
        assert table.key.precision == precision and table.unit == "ms"
        assert sorted(table.attention) == [0, 1, 2] and sorted(table.ffn) == [0, 64]
        assert 0 < table.base and table.meta["dense_measured"] > 0
        path = latency.table_cache_path(table.key, tmp_path, 64)
        assert path.name.startswith(f"latency-deepsparse-{precision}-")
        assert LatencyTable.from_json(path.read_text()) == table
    # another runtime is another key: an ORT table is never read for DeepSparse
    ort_key = latency.shape_key(config, threads=1, sequence_length=16)
    assert latency.table_cache_path(ort_key, tmp_path, 64) != path
