"""A third-party modifier plugin used by tests/test_registration.py.

It is never imported by the tests themselves: the test exposes it as an installed distribution
(a ``*.dist-info`` folder with ``entry_points.txt`` in the ``obert_modifiers.modifiers`` group) and
the stock SparseML console scripts must find ``!ObertTestClipModifier`` on their own.

``ObertTestClipModifier`` clamps the matched weights to ``[-clip, clip]`` after every optimizer step
inside its epoch range, and appends one JSON line per event to the file named by the environment
variable ``OBERT_TEST_PLUGIN_LOG`` (if set), so the test can see which process used it and how often.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from sparseml.optim import ModifierProp
from sparseml.pytorch.sparsification.modifier import PyTorchModifierYAML, ScheduledModifier

LOG_ENV = "OBERT_TEST_PLUGIN_LOG"


def _log(event: str, **facts: Any) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"event": event, "pid": os.getpid(), **facts}) + "\n")


@PyTorchModifierYAML()
class ObertTestClipModifier(ScheduledModifier):
    """Clamp ``params`` (exact parameter names) to ``[-clip, clip]`` after each optimizer step."""

    def __init__(self, params: list[str], clip: float, start_epoch: float = -1.0, end_epoch: float = -1.0):
        super().__init__(start_epoch=start_epoch, end_epoch=end_epoch, end_comparator=-1)
        if not isinstance(params, list) or not params:
            raise ValueError(
                f"ObertTestClipModifier: 'params' must be a non-empty list of names, got {params!r}"
            )
        self._params = [str(p) for p in params]
        self._clip = float(clip)
        self._steps = 0
        _log("constructed", clip=self._clip)

    @ModifierProp()
    def params(self) -> list[str]:
        return self._params

    @params.setter
    def params(self, value: list[str]) -> None:
        self._params = value

    @ModifierProp()
    def clip(self) -> float:
        return self._clip

    @clip.setter
    def clip(self, value: float) -> None:
        self._clip = float(value)

    def _targets(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        named = dict(module.named_parameters())
        missing = [p for p in self._params if p not in named]
        if missing:
            raise ValueError(f"ObertTestClipModifier: no parameter named {missing} in the model")
        return [named[p] for p in self._params]

    def initialize(
        self, module: torch.nn.Module, epoch: float = 0, loggers: Any = None, **kwargs: Any
    ) -> None:
        super().initialize(module, epoch, loggers, **kwargs)
        self._targets(module)  # fail early on a wrong name

    def optimizer_post_step(
        self, module: torch.nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        super().optimizer_post_step(module, optimizer, epoch, steps_per_epoch)
        if epoch < self.start_epoch or (self.end_epoch >= 0 and epoch >= self.end_epoch):
            return  # outside [start_epoch, end_epoch): leave the weights alone
        with torch.no_grad():
            for parameter in self._targets(module):
                parameter.clamp_(-self._clip, self._clip)
        self._steps += 1

    def finalize(
        self, module: torch.nn.Module | None = None, reset_loggers: bool = True, **kwargs: Any
    ) -> None:
        _log("finalized", steps=self._steps, clip=self._clip)
        super().finalize(module, reset_loggers, **kwargs)
