"""Where a ZipLM model's speed-up goes: the shipped file against the latency table's prediction.

For each named deployment of ``benchmarks/structured.py`` (``runs/pipeline/<work>/structured-deployments``)
it times on ONNX Runtime (b1, seq 128, 2 threads, median of rounds): the shipped ``model.onnx``, the same
structure built the latency table's way (random weights, ``obert_modifiers.latency``'s exporter), and
prints them beside the table's prediction; then whole uniform models (k heads / n FFN neurons in every
layer) beside what the table predicts for them. A diagnostic: it writes nothing but its printout.

    .venv/bin/python benchmarks/latency_check.py runs/pipeline/full-2000 ziplm-2x ziplm-3x ziplm-5x
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _time(path: Path, feed: dict, rounds: int = 5, runs: int = 30) -> float:
    from obert_modifiers import latency

    session = latency._session(path, 2)
    names = [i.name for i in session.get_inputs()]
    feed = {k: v for k, v in feed.items() if k in names}
    for _ in range(5):
        session.run(None, feed)
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - began) * 1e3)
        medians.append(statistics.median(times))
    return statistics.median(medians)


def main(argv: list[str]) -> int:
    import numpy as np
    import torch
    from transformers import BertModel

    from obert_modifiers import latency
    from obert_modifiers.algorithms import shrink
    from obert_modifiers.algorithms.latency_search import LatencyTable

    work, names = Path(argv[0]), argv[1:]
    deployments = work / "structured-deployments"
    first = json.loads((deployments / names[0] / "export.json").read_text())["structure"]
    table = LatencyTable.from_json(
        latency.table_cache_path(latency.LatencyKey(**first["latency_key"])).read_text()
    )
    config = latency._bert_config(table.key)
    ids = torch.randint(0, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(1, 128, dtype=torch.long)}
    feed = {k: v.numpy() for k, v in inputs.items()}
    tmp = Path(tempfile.mkdtemp(prefix="obert-latency-check-"))

    def built(heads: list[int], ffn: list[int]) -> float:
        torch.manual_seed(0)
        model = BertModel(copy.deepcopy(config)).eval()
        shrink.shrink_model(model, dict(enumerate(map(range, heads))), dict(enumerate(map(range, ffn))))
        path = tmp / "model.onnx"
        latency._export(model, inputs, path)
        return _time(path, feed)

    shipped_feed = {**feed, "token_type_ids": np.zeros((1, 128), dtype=np.int64)}
    for name in names:
        structure = json.loads((deployments / name / "export.json").read_text())["structure"]
        heads, ffn = structure["heads"], structure["ffn"]
        shipped, rebuilt = _time(deployments / name / "model.onnx", shipped_feed), built(heads, ffn)
        print(f"{name}: heads {heads} FFN {ffn}: predicted {structure['predicted_latency']:.2f} ms, "
              f"built the table's way {rebuilt:.2f} ms, shipped {shipped:.2f} ms", flush=True)  # fmt: skip
    depth, h, width = table.key.num_hidden_layers, table.key.num_attention_heads, table.key.intermediate_size
    for k in (4, 7, 8, 10, h):
        print(f"uniform {k} heads: {built([k] * depth, [width] * depth):.2f} ms, "
              f"table {table.predict([k] * depth, [width] * depth):.2f} ms", flush=True)  # fmt: skip
    for n in sorted(set(table.ffn) & {128, 384, 512, 896, width}):
        print(f"uniform FFN {n}: {built([h] * depth, [n] * depth):.2f} ms, "
              f"table {table.predict([h] * depth, [n] * depth):.2f} ms", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
