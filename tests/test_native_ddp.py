"""The native adapter under ``torchrun --nproc_per_node 2`` (CPU, gloo): SparseML's steps per epoch
(the world size counts), pruning at the same steps on both ranks, and at the end the same masks,
weights and quantization parameters on every rank (the Fisher statistics are all-reduced and the
pruned weights broadcast; frozen quantization ranges are broadcast from rank 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers (the [modern] extra)")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the native adapter targets transformers 5 (the modern venv)", allow_module_level=True)

SCRIPT = Path(__file__).parent / "ddp_native.py"


def test_two_ranks_end_with_the_same_model(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", str(SCRIPT), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in ranks:
        assert record["world_size"] == 2
        assert record["steps_per_epoch"] == 4  # ceil(64 / (8 per device * 2 ranks))
        assert record["global_step"] == 12
        assert [h[:3] for h in record["history"]] == [[0, 0.0, 0.4], [4, 1.0, 0.6]]
        assert record["num_quantizers"] > 0
    first, second = ranks
    for key in ("history", "masks", "weights", "quantization", "lr"):
        assert first[key] == second[key], key
