"""Training probe for tests/test_compat.py and tests/test_resume.py: watches a STOCK training process
from inside, without changing what it does.

A test puts this folder first on ``PYTHONPATH`` and names a log file in ``OBERT_TRAIN_PROBE_LOG``;
Python then imports this ``sitecustomize`` at start-up (after the package's ``.pth`` hook). It adds
two observers and nothing else:

* a global torch optimizer step pre-hook: every real optimizer step (the ``torch.optim`` optimizer
  whose ``step`` updates the weights, whatever wraps it) logs ``{"event": "step", "lr": ...}`` with
  the learning rate that step uses;
* a ``TrainerCallback`` appended to ``transformers.trainer.DEFAULT_CALLBACKS`` (every HF trainer gets
  it): each trainer log with a learning rate logs ``{"event": "log", "step", "logged", "held"}``,
  ``held`` being the learning rate the stepping optimizer's param groups hold at that moment.

One JSON object per line, appended as it happens (a killed run keeps what it logged).
"""

from __future__ import annotations

import json
import os

LOG_ENV = "OBERT_TRAIN_PROBE_LOG"
_stepping: list = []  # the optimizer that stepped last


def _write(event: str, **facts) -> None:
    with open(os.environ[LOG_ENV], "a") as handle:
        handle.write(json.dumps({"event": event, "pid": os.getpid(), **facts}) + "\n")


def _on_step(optimizer, args, kwargs) -> None:
    _stepping[:] = [optimizer]
    _write("step", lr=float(optimizer.param_groups[0]["lr"]), optimizer=type(optimizer).__name__)


def _install(trainer_module) -> None:
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from transformers import TrainerCallback

    class TrainProbeCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "learning_rate" in logs and _stepping:
                held = float(_stepping[0].param_groups[0]["lr"])
                _write("log", step=state.global_step, logged=float(logs["learning_rate"]), held=held)

    register_optimizer_step_pre_hook(_on_step)
    trainer_module.DEFAULT_CALLBACKS.append(TrainProbeCallback)


if os.environ.get(LOG_ENV):
    from obert_modifiers import _hook

    _hook.after_import("transformers.trainer", _install)
