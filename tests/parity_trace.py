"""Train with one adapter and write what the recipe did as JSON (the cross-adapter parity test).

    python tests/parity_trace.py sparseml OUT.json -- <text-classification flags>   # in .venv
    python tests/parity_trace.py native OUT.json -- <the same flags>                # in .venv-modern

``sparseml`` runs SparseML's stock ``sparseml.transformers.train.text_classification`` main (our tags
registered as in any process); ``native`` runs ``obert train text-classification`` on the native
engine. Both record, through a thin wrapper around the real methods (they still run):

- ``lr``: ``[epoch, learning rate of param group 0]`` at every optimizer step, after the recipe's
  update (the rate that step uses);
- ``prune``: every oBERT pruning step: epoch, target, achieved sparsity, and the keep masks
  (packed bits, base64, by parameter name);
- ``layers``: ``num_hidden_layers`` and ``obert_layer_map`` of the saved model.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import numpy as np

TRACE: dict = {"lr": [], "prune": []}


def _pack(mask) -> dict:
    flat = mask.detach().cpu().reshape(-1).numpy().astype(bool)
    return {"size": int(flat.size), "bits": base64.b64encode(np.packbits(flat).tobytes()).decode()}


def unpack(entry: dict) -> np.ndarray:
    bits = np.frombuffer(base64.b64decode(entry["bits"]), dtype=np.uint8)
    return np.unpackbits(bits)[: entry["size"]].astype(bool)


def _trace_sparseml() -> None:
    from sparseml.pytorch.optim.manager import ScheduledModifierManager

    from obert_modifiers.modifiers.obert_pruning import OBertPruningModifier

    pre_step = ScheduledModifierManager.optimizer_pre_step

    def optimizer_pre_step(self, module, optimizer, epoch, steps_per_epoch):
        TRACE["lr"].append([float(epoch), float(optimizer.param_groups[0]["lr"])])
        return pre_step(self, module, optimizer, epoch, steps_per_epoch)

    ScheduledModifierManager.optimizer_pre_step = optimizer_pre_step
    update = OBertPruningModifier.update

    def pruning_update(self, module, optimizer, epoch, steps_per_epoch):
        update(self, module, optimizer, epoch, steps_per_epoch)
        TRACE["prune"].append(
            {
                "epoch": float(epoch),
                "target": float(self._last_sparsity[0]),
                "achieved": float(self._last_stats.achieved),
                "masks": {name: _pack(mask) for name, mask in zip(self._names, self._masks, strict=True)},
            }
        )

    OBertPruningModifier.update = pruning_update


def _trace_native() -> None:
    from obert_modifiers.native.lifecycle import OBertPruning, RecipeRunner

    before = RecipeRunner.before_optimizer_step

    def before_optimizer_step(self, optimizer):
        before(self, optimizer)
        _, epoch, rate = self.lr_trace[-1]
        TRACE["lr"].append([float(epoch), float(rate)])

    RecipeRunner.before_optimizer_step = before_optimizer_step
    update = OBertPruning.update

    def pruning_update(self, ctx):
        update(self, ctx)
        last = self.history[-1]
        TRACE["prune"].append(
            {
                "epoch": float(last["epoch"]),
                "target": float(last["target"]),
                "achieved": float(last["achieved"]),
                "masks": {name: _pack(mask) for name, mask in zip(self.names, self.masks, strict=True)},
            }
        )

    OBertPruning.update = pruning_update


def main(argv: list[str]) -> int:
    side, out, separator, *flags = argv
    assert separator == "--" and side in ("sparseml", "native"), (
        "usage: parity_trace.py sparseml|native OUT -- FLAGS"
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    if side == "sparseml":
        _trace_sparseml()
        from sparseml.transformers.text_classification import main as stock_main

        sys.argv = ["sparseml.transformers.train.text_classification", *flags]
        stock_main()
    else:
        _trace_native()
        from obert_modifiers.native.train import main as native_main

        native_main("text-classification", flags)
    output_dir = Path(flags[flags.index("--output_dir") + 1])
    config = json.loads((output_dir / "config.json").read_text())
    TRACE["layers"] = {"num_hidden_layers": config["num_hidden_layers"], "map": config.get("obert_layer_map")}
    Path(out).write_text(json.dumps(TRACE))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
