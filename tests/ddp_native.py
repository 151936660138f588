"""A run of the native adapter under torchrun (CPU, gloo): ``torchrun --nproc_per_node 2
tests/ddp_native.py OUT_DIR``. Every rank writes ``OUT_DIR/rank<r>.json`` with what its copy of the
recipe did and checksums of its masks, weights and quantization parameters (tests/test_native_ddp.py
compares the ranks)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from _native import TinyData, tiny_model, trainer  # noqa: E402

RECIPE = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 3.0
  - !LearningRateFunctionModifier
    lr_func: linear
    init_lr: 1.0e-3
    final_lr: 1.0e-4
    start_epoch: 0.0
    end_epoch: 3.0
  - !LayerDropModifier
    keep: 2
    num_layers: 4
  - !OBertPruningModifier
    params: ["re:bert.encoder.layer.*.(attention.self.(query|key|value)|intermediate.dense).weight"]
    init_sparsity: 0.4
    final_sparsity: 0.6
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 1.0
    num_grads: 8
    fisher_block_size: 16
    grad_sampler_kwargs:
      batch_size: 4
  - !OBertQuantizationModifier
    start_epoch: 1.0
    freeze_observer_epoch: 2.0
"""


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    run = trainer(
        RECIPE,
        out / "train",
        model=tiny_model(),
        data=TinyData(64),
        ddp_backend="gloo",
        per_device_train_batch_size=8,
    )
    run.train()
    runner = run.recipe_runner
    pruning = next(m for m in runner.modifiers if m.tag == "OBertPruningModifier")
    state = run.model.state_dict()
    quant = sorted(k for k in state if k.endswith((".scale", ".zero_point")))
    record = {
        "rank": rank,
        "world_size": torch.distributed.get_world_size(),
        "steps_per_epoch": runner.steps_per_epoch,
        "global_step": run.state.global_step,
        "history": [(h["step"], h["epoch"], h["target"], h["achieved"]) for h in pruning.history],
        "masks": digest(pruning.masks),
        "weights": digest(state[k] for k in sorted(state) if k not in quant),
        "quantization": digest(state[k] for k in quant),
        "num_quantizers": len(quant),
        "lr": [rate for _, _, rate in runner.lr_trace],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
