"""Sparsity schedules and top-k masks (pure torch).

``interpolate`` follows the semantics of SparseML's ``sparseml.utils.interpolate`` (x clamped to
[x0, x1], the curve in the unit square, snapping to y0/y1 within float epsilon) so that a schedule
written for SparseML's OBS/GMP modifiers prunes to the same targets with ours.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "INTERPOLATIONS",
    "interpolate",
    "recomputation_targets",
    "epoch_from_steps",
    "PruningSchedule",
    "select_keep_masks",
    "expand_group_mask",
]

INTERPOLATIONS = ("linear", "cubic", "inverse_cubic")


def interpolate(x: float, x0: float, x1: float, y0: float, y1: float, inter_func: str = "linear") -> float:
    """Map x in [x0, x1] to [y0, y1] along ``linear``, ``cubic`` (1-(1-t)^3, fast start, as in the
    gradual pruning of Zhu & Gupta) or ``inverse_cubic`` (1-(1-t)^(1/3))."""
    if inter_func not in INTERPOLATIONS:
        raise ValueError(f"inter_func must be one of {INTERPOLATIONS}, got {inter_func!r}")
    if x1 == x0:
        return y1 if x >= x1 else y0
    t = (x - x0) / (x1 - x0)
    if inter_func == "linear":
        fraction = t
    elif inter_func == "cubic":
        fraction = 1 - (1 - t) ** 3
    else:
        fraction = 1 - (1 - t) ** (1 / 3) if t <= 1 else 1.0
    if isinstance(fraction, complex) or fraction <= sys.float_info.epsilon:
        return y0
    if fraction >= 1.0 - sys.float_info.epsilon:
        return y1
    return fraction * (y1 - y0) + y0


def recomputation_targets(last_sparsity: float, target_sparsity: float, num_recomputations: int) -> list:
    """Intermediate targets when one pruning step is split into ``num_recomputations`` jumps with
    a fresh Fisher estimate before each (linear from the last applied sparsity to the target)."""
    return [
        interpolate(i, 0, num_recomputations, last_sparsity, target_sparsity, "linear")
        for i in range(1, num_recomputations + 1)
    ]


def epoch_from_steps(steps: int, steps_per_epoch: int) -> float:
    """The fractional epoch SparseML's step wrapper reports after ``steps`` optimizer steps."""
    return steps // steps_per_epoch + (steps % steps_per_epoch) / steps_per_epoch


@dataclass
class PruningSchedule:
    """When pruning steps happen and to what sparsity, with SparseML's update rule: the first step
    at the first epoch >= start_epoch, then whenever epoch >= last step + update_frequency, and a
    last step at the first epoch >= end_epoch (to ``final_sparsity``)."""

    init_sparsity: float
    final_sparsity: float
    start_epoch: float
    end_epoch: float
    update_frequency: float
    inter_func: str = "cubic"

    def target(self, epoch: float) -> float:
        epoch = min(max(epoch, self.start_epoch), self.end_epoch)
        return interpolate(
            epoch, self.start_epoch, self.end_epoch, self.init_sparsity, self.final_sparsity, self.inter_func
        )

    def is_due(self, epoch: float, last_step_epoch: float | None, ended: bool) -> bool:
        """Whether a pruning step is due at ``epoch`` given the epoch of the last one."""
        if ended or epoch < self.start_epoch:
            return False
        if last_step_epoch is None:
            return True
        if epoch >= self.end_epoch:
            return True
        if self.update_frequency <= 0:
            return True
        return epoch >= last_step_epoch + self.update_frequency

    def replay(self, steps: int, steps_per_epoch: int) -> tuple:
        """Replay the schedule over optimizer steps 0..steps-1 (resume): returns
        (number of pruning steps done, epoch of the last one or None, ended)."""
        done, last, ended = 0, None, False
        for step in range(steps):
            epoch = epoch_from_steps(step, steps_per_epoch)
            if self.is_due(epoch, last, ended):
                done, last = done + 1, epoch
                if epoch >= self.end_epoch:
                    ended = True
        return done, last, ended


def expand_group_mask(group_mask: Tensor, group: int, shape: torch.Size) -> Tensor:
    """A mask over runs of ``group`` consecutive weights, expanded to the weight's shape."""
    return group_mask.reshape(-1, 1).expand(-1, group).reshape(shape)


def _keep_mask_for_scores(scores: Tensor, num_prune: int) -> Tensor:
    """Keep all but the ``num_prune`` lowest scores (ties broken by position, deterministic)."""
    total = scores.numel()
    keep = torch.ones(total, dtype=torch.bool, device=scores.device)
    if num_prune <= 0:
        return keep
    if num_prune >= total:
        return torch.zeros_like(keep)
    threshold = torch.kthvalue(scores.float().cpu() if scores.is_cuda else scores, num_prune).values.to(
        scores.device
    )
    below = scores < threshold
    keep &= ~below
    remaining = num_prune - int(torch.count_nonzero(below))  # no int64 copy of the mask
    if remaining > 0:  # prune the first `remaining` entries equal to the threshold
        ties = torch.nonzero(scores == threshold).flatten()[:remaining]
        keep[ties] = False
    return keep


def select_keep_masks(scores: Sequence[Tensor], sparsities: Sequence[float], global_sparsity: bool) -> list:
    """Boolean keep-masks (True = keep) from flat scores, pruning the lowest.

    ``global_sparsity``: one threshold over all tensors so that ``round(total * s)`` entries are
    pruned (all sparsities must then be equal); otherwise ``round(numel_i * s_i)`` per tensor.
    Rounding follows Python's ``round`` as SparseML's mask creators do."""
    if len(scores) != len(sparsities):
        raise ValueError("one sparsity per score tensor is required")
    if global_sparsity:
        if any(abs(s - sparsities[0]) > 1e-12 for s in sparsities):
            raise ValueError(f"global sparsity needs one target for all tensors, got {list(sparsities)}")
        flat = torch.cat([s.reshape(-1) for s in scores])
        keep = _keep_mask_for_scores(flat, round(flat.numel() * sparsities[0]))
        return list(torch.split(keep, [s.numel() for s in scores]))
    return [
        _keep_mask_for_scores(s.reshape(-1), round(s.numel() * t))
        for s, t in zip(scores, sparsities, strict=False)
    ]


def sparsity_of(tensors: Sequence[Tensor]) -> float:
    """Fraction of exact zeros over all ``tensors``."""
    total = sum(t.numel() for t in tensors)
    zeros = sum(t.numel() - int(torch.count_nonzero(t)) for t in tensors)
    return zeros / total if total else 0.0


def validate_fraction(value: float, name: str) -> float:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be within [0, 1], got {value}")
    return value
