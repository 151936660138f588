"""Benchmark and runtimes on exported folders: DeepSparse and ONNX Runtime run the same files and
agree on predictions; the stock ``deepsparse.benchmark`` runs on the folder's model.onnx. No test
asserts a timing (DeepSparse spins on its cores; a shared box skews every figure)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import textwrap

import pytest

np = pytest.importorskip(
    "numpy", reason="the benchmark runner needs numpy (the [sparseml] or [modern] extra)"
)
pytest.importorskip("torch", reason="needs torch (the [sparseml] or [modern] extra)")

from test_quantization import SENTENCES, shared_artifacts  # noqa: E402

REAL_SENTENCES = SENTENCES + [
    "Shares in the carmaker rose sharply after it reported record profits.",
    "The striker scored twice as the home side came back to win.",
    "It is not a masterpiece, but the cast is charming.",
    "Parliament will vote on the new budget next week.",
]


@pytest.fixture(scope="module")
def artifacts(tiny_bert_dir, tmp_path_factory):
    return shared_artifacts(tiny_bert_dir, tmp_path_factory)


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.integration
def test_run_benchmark_both_engines_on_a_copy(artifacts):
    from obert_modifiers.bench import run_benchmark

    folder = artifacts["int8"].path
    before = _md5(folder / "model.onnx")
    results = run_benchmark(
        folder,
        engines=("deepsparse", "onnxruntime"),
        batch_size=2,
        sequence_length=32,
        num_cores=1,
        seconds=0.3,
        warmup_seconds=0.1,
    )
    assert [r.engine for r in results] == ["deepsparse", "onnxruntime"]
    for result in results:
        assert result.ok, result.error
        assert result.batch_size == 2 and result.sequence_length == 32 and result.num_cores == 1
        assert result.iterations >= 5
        assert 0 < result.median_ms <= result.p90_ms
        assert result.items_per_second == pytest.approx(2000.0 / result.mean_ms)
    assert _md5(folder / "model.onnx") == before


def test_missing_engine_is_reported_not_raised(artifacts):
    """With DeepSparse unimportable (as on a machine without the extra), the result says so."""
    folder = artifacts["fp32"].path
    script = textwrap.dedent(f"""
        import sys, json
        sys.modules["deepsparse"] = None  # what a missing package looks like to `import`
        from obert_modifiers.bench import run_benchmark
        results = run_benchmark({str(folder)!r}, seconds=0.2, warmup_seconds=0.05, sequence_length=16,
                                num_cores=1)
        print(json.dumps([r.to_dict() for r in results]))
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    deepsparse, onnxruntime = json.loads(completed.stdout.strip().splitlines()[-1])
    assert deepsparse["status"] == "unavailable" and "deepsparse" in deepsparse["error"]
    assert math.isnan(deepsparse["median_ms"])
    assert onnxruntime["status"] == "ok" and onnxruntime["median_ms"] > 0


def test_bad_benchmark_inputs(tmp_path):
    from obert_modifiers.bench import BenchmarkError, run_benchmark

    with pytest.raises(BenchmarkError, match="does not exist"):
        run_benchmark(tmp_path / "nope")
    with pytest.raises(BenchmarkError, match="has no model.onnx"):
        run_benchmark(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(BenchmarkError, match="unknown engine"):
        run_benchmark(tmp_path, engines=("tensorrt",))


def test_paired_speedups_alternate_blocks_and_pair_each_ratio(artifacts, tmp_path):
    """Each pair times both models back to back (ABBA) and its ratio is baseline / candidate of
    that pair's block medians; a model against itself comes out near 1."""
    from obert_modifiers.bench import BenchmarkError, paired_speedups

    fp32, int8 = artifacts["fp32"].path, artifacts["int8"].path
    told = []
    result = paired_speedups(
        fp32,
        {"self": fp32, "int8": int8},
        sequence_length=32,
        num_cores=1,
        pairs=6,
        block_seconds=0.05,
        warmup_seconds=0.05,
        progress=lambda name, paired: told.append((name, len(paired.ratios))),
    )
    assert list(result) == ["self", "int8"] and told == [("self", 6), ("int8", 6)]
    for paired in result.values():
        assert paired.sequence_length == 32 and paired.batch_size == 1 and paired.num_cores == 1
        assert len(paired.baseline_ms) == len(paired.candidate_ms) == 6
        assert paired.ratios == pytest.approx(
            [b / c for b, c in zip(paired.baseline_ms, paired.candidate_ms, strict=True)]
        )
        low, high = paired.quartiles
        assert 0 < low <= paired.median <= high
        assert paired.to_dict()["median"] == paired.median
    assert result["int8"].candidate.endswith("int8-deployment/model.onnx")
    assert 0.5 < result["self"].median < 2.0

    with pytest.raises(BenchmarkError, match="pairs must be >= 1"):
        paired_speedups(fp32, {"x": int8}, pairs=0)
    with pytest.raises(BenchmarkError, match="does not exist"):
        paired_speedups(fp32, {"x": tmp_path / "nope"})


@pytest.mark.integration
def test_stock_deepsparse_benchmark_runs_on_the_folder_model(artifacts):
    from obert_modifiers.bench import run_deepsparse_benchmark_cli

    folder = artifacts["int8"].path
    before = _md5(folder / "model.onnx")
    report = run_deepsparse_benchmark_cli(
        folder, batch_size=1, sequence_length=32, num_cores=1, seconds=1, warmup_seconds=0
    )
    assert report["engine"].startswith("deepsparse")
    items_per_second = report["benchmark_result"]["items_per_sec"]
    assert isinstance(items_per_second, float) and items_per_second > 0
    assert _md5(folder / "model.onnx") == before  # it ran on a copy


@pytest.mark.integration
def test_deepsparse_pipeline_and_onnxruntime_agree_on_real_sentences(artifacts, tmp_path):
    """DeepSparse loads the INT8 folder as is (Pipeline: config, tokenizer, model.onnx) and gives
    the same predictions as ONNX Runtime on the same file for a batch of real sentences."""
    import onnxruntime as ort
    from deepsparse import Pipeline
    from transformers import AutoTokenizer

    folder = artifacts["int8"].path
    config = json.loads((folder / "config.json").read_text())
    # the Pipeline rewrites model.onnx IN PLACE (static input shapes): give it a copy
    copy = tmp_path / "deployment"
    shutil.copytree(folder, copy)
    pipeline = Pipeline.create(
        task="text-classification",
        model_path=str(copy),
        batch_size=len(REAL_SENTENCES),
        sequence_length=64,
        num_cores=1,
    )
    output = pipeline(sequences=REAL_SENTENCES)
    deepsparse_labels = [labels[0] if isinstance(labels, list) else labels for labels in output.labels]

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoded = tokenizer(
        REAL_SENTENCES, padding="max_length", max_length=64, truncation=True, return_tensors="np"
    )
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: encoded[i.name].astype(np.int64) for i in session.get_inputs()}
    logits = session.run(None, feed)[0]
    ort_labels = [config["id2label"][str(i)] for i in logits.argmax(-1)]
    assert deepsparse_labels == ort_labels
    assert set(ort_labels) <= set(config["id2label"].values())


def test_benchmark_cli_table_speedup_and_json(artifacts, tmp_path):
    from typer.testing import CliRunner

    from obert_modifiers.cli import _build

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        _build(),
        [
            "benchmark",
            str(artifacts["int8"].path),
            "--engine",
            "onnxruntime",
            "--batch-size",
            "1",
            "--sequence-length",
            "16",
            "--num-cores",
            "1",
            "--seconds",
            "0.2",
            "--warmup",
            "0.05",
            "--baseline",
            str(artifacts["fp32"].path),
            "--pairs",
            "3",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "onnxruntime" in result.output and "speedup" in result.output
    assert "paired ORT speedup vs baseline" in result.output
    data = json.loads(out.read_text())
    paired = data["paired_onnxruntime"]
    assert len(paired["ratios"]) == 3 and paired["sequence_length"] == 16
    assert paired["candidate"].startswith(str(artifacts["int8"].path))
    bad = CliRunner().invoke(_build(), ["benchmark", str(artifacts["int8"].path), "--pairs", "2"])
    assert bad.exit_code == 1 and "--pairs 2: give a count >= 1 together with --baseline" in bad.output
    (row,) = data["results"]
    assert row["engine"] == "onnxruntime" and row["median_ms"] > 0
    assert row["speedup_same_engine"] > 0 and row["speedup_vs_baseline_onnxruntime"] > 0
    assert data["baseline"] == str(artifacts["fp32"].path)
    # the engine path: ORT's providers and the file's INT8 form, in the table and the JSON
    manifest = json.loads((artifacts["int8"].path / "export.json").read_text())
    assert row["path"]["providers"][-1] == "CPUExecutionProvider"
    assert row["path"]["int8_form"] == manifest["int8_format"]
    assert f"INT8 {manifest['int8_format']}" in result.output
    assert data["baseline_results"][0]["path"]["int8_form"] is None  # FP32


def test_benchmark_records_each_engines_path(artifacts):
    """ORT: providers, the file's INT8 form and whether its integer kernel is exact here;
    DeepSparse: its own ISA/VNNI detection and INT8 native or emulated; both: the CPU flags."""
    from obert_modifiers.bench import run_benchmark
    from obert_modifiers.bench.runner import describe_path
    from obert_modifiers.export.parity import INT8_KERNELS, int8_kernels_exact
    from obert_modifiers.latency import cpu_flags

    manifest = json.loads((artifacts["int8"].path / "export.json").read_text())
    results = run_benchmark(
        artifacts["int8"].path,
        engines=("onnxruntime", "deepsparse"),
        sequence_length=16,
        num_cores=1,
        seconds=0.2,
        warmup_seconds=0.05,
    )
    flags = cpu_flags()
    by_engine = {r.engine: r for r in results}
    ort_path = by_engine["onnxruntime"].path
    assert ort_path["cpu_flags"] == cpu_flags(("avx2", "avx512f", "avx512_vnni", "avx_vnni"))
    assert ort_path["providers"] == ["CPUExecutionProvider"]
    form = manifest["int8_format"]
    assert ort_path["int8_form"] == form and ort_path["int8_kernel"] == INT8_KERNELS[form]
    assert ort_path["int8_kernel_exact"] == int8_kernels_exact()[INT8_KERNELS[form]]
    ds = by_engine["deepsparse"]
    if ds.status != "unavailable":
        vnni = flags["avx512_vnni"] or flags["avx_vnni"]
        assert ds.path["vnni"] == vnni and ds.path["isa"] in ("avx2", "avx512", "avx512_vnni", "neon")
        assert ds.path["int8"] == ("native" if vnni else "emulated")
        assert describe_path(ds.path).endswith("" if vnni else "emulated (no VNNI)")
    fp32 = run_benchmark(
        artifacts["fp32"].path,
        engines=("onnxruntime",),
        sequence_length=16,
        num_cores=1,
        seconds=0.1,
        warmup_seconds=0.05,
    )
    assert fp32[0].path["int8_form"] is None and describe_path(fp32[0].path) == "CPU, FP32"
