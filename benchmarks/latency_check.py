"""Where a ZipLM model's speed-up goes: the latency table's prediction against paired timings.

A diagnostic: it writes nothing but its printout. On ONNX Runtime (b1, seq 128, 2 threads), each
model is timed against a dense reference in back-to-back pairs of short blocks
(``obert_modifiers.bench.paired_speedups``), and the measured speed-up is printed beside the table's:

- each named deployment of ``benchmarks/structured.py`` (``<work>/structured-deployments/<name>``)
  against the dense deployment;
- the same structures built the table's way (random weights, ``obert_modifiers.latency``'s
  exporter) against the dense model built that way;
- uniform models built the table's way: ones that keep one block type whole (the kind of model the
  table is fitted to) and ones that shrink both (the kind the search picks, which the table only
  extrapolates to).

    .venv/bin/python benchmarks/latency_check.py runs/pipeline/full-all ziplm-2x ziplm-3x ziplm-5x
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

# (heads, FFN neurons) in every layer: one block type whole, then both shrunk
UNIFORM = [(4, None), (8, None), (None, 256), (None, 768), (8, 768), (6, 512), (4, 256), (2, 128)]


def main(argv: list[str]) -> int:
    import torch
    from transformers import BertModel

    from obert_modifiers import latency
    from obert_modifiers.algorithms import shrink
    from obert_modifiers.algorithms.latency_search import LatencyTable
    from obert_modifiers.bench import paired_speedups

    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    work, names = Path(argv[0]), argv[1:]
    deployments = work / "structured-deployments"
    structures = {n: json.loads((deployments / n / "export.json").read_text())["structure"] for n in names}
    first = structures[names[0]]
    table = LatencyTable.from_json(
        latency.table_cache_path(latency.LatencyKey(**first["latency_key"])).read_text()
    )
    key = table.key
    config = latency._bert_config(key)
    depth, h, width = key.num_hidden_layers, key.num_attention_heads, key.intermediate_size
    ids = torch.randint(
        0, config.vocab_size, (1, key.sequence_length), generator=torch.Generator().manual_seed(0)
    )
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tmp = Path(tempfile.mkdtemp(prefix="obert-latency-check-"))

    def built(name: str, heads: list[int], ffn: list[int]) -> Path:
        torch.manual_seed(0)
        model = BertModel(copy.deepcopy(config)).eval()
        shrink.shrink_model(model, dict(enumerate(map(range, heads))), dict(enumerate(map(range, ffn))))
        folder = tmp / name
        folder.mkdir()
        latency._export(model, inputs, folder / "model.onnx")
        config.to_json_file(str(folder / "config.json"))  # make_inputs reads the vocabulary size
        return folder

    def report(title: str, predicted: dict, measured: dict) -> None:
        print(f"\n{title}\n{'model':34s} {'predicted':>9s} {'paired':>7s} {'quartiles':>11s} {'error':>6s}")
        for name, paired in measured.items():
            low, high = paired.quartiles
            error = paired.median / predicted[name] - 1
            figures = f"{predicted[name]:8.2f}x {paired.median:6.2f}x {low:5.2f}-{high:<5.2f} {error:+6.0%}"
            print(f"{name:34s} {figures}")

    def timed(baseline: Path, candidates: dict) -> dict:
        return paired_speedups(
            baseline, candidates, sequence_length=key.sequence_length, num_cores=key.threads, pairs=20,
            progress=lambda name, r: print(f"[paired] {name}: {r.median:.2f}x", flush=True),
        )  # fmt: skip

    dense_ms = table.predict([h] * depth, [width] * depth)
    shipped = {n: deployments / n for n in names}
    report(
        "shipped deployments against the dense deployment",
        {n: s["predicted_speedup"] for n, s in structures.items()},
        timed(deployments / "dense", shipped),
    )
    models, predicted = {}, {}
    for n, s in structures.items():
        models[f"{n} (built)"] = built(n, s["heads"], s["ffn"])
        predicted[f"{n} (built)"] = dense_ms / table.predict(s["heads"], s["ffn"])
    for heads, ffn in UNIFORM:
        heads, ffn = heads or h, ffn or width
        name = f"uniform {heads} heads, FFN {ffn}"
        models[name] = built(name.replace(" ", "-").replace(",", ""), [heads] * depth, [ffn] * depth)
        predicted[name] = dense_ms / table.predict([heads] * depth, [ffn] * depth)
    dense = built("dense", [h] * depth, [width] * depth)
    report("built the table's way, against the dense model built that way", predicted, timed(dense, models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
