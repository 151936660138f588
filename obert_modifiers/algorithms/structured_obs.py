"""Structured Optimal Brain Surgeon over groups of input columns (ZipLM's layer-wise pruning; pure torch).

A linear layer ``y = W x`` (``W`` is ``[rows, cols]``) is pruned against its own reconstruction
error on calibration inputs ``X`` (``[N, cols]``, one row per token):

    L(W_hat) = (1/N) sum_tokens ||(W - W_hat) x||^2 = 1/2 tr(dW H dW^T),   H = 2 X^T X / N

``H`` is the same for every output row, so one inverse serves the whole matrix. The structures
are groups of input columns: an attention head is the ``d_head`` adjacent input columns of the
attention output projection, an FFN neuron is one input column of the FFN output projection
(the matching rows of Q/K/V or of the first FFN linear then feed nothing and go too). For a
column set ``M`` and ``Hi = H^-1``:

    saliency        eps_M = tr(W[:, M] (Hi[M, M])^-1 W[:, M]^T)          (loss rises by eps_M / 2)
    weight update   W    -= W[:, M] (Hi[M, M])^-1 Hi[M, :]               (then W[:, M] = 0)
    inverse update  Hi   -= Hi[:, M] (Hi[M, M])^-1 Hi[M, :]              (then Hi[M, M] = I)

After the inverse update ``Hi`` restricted to the live columns is the inverse of ``H`` restricted
to them, so removing groups one after another gives, at every step, the weights that solve the
constrained least-squares problem for everything removed so far, and the summed ``eps / 2`` is
exactly that problem's error. :func:`structured_obs` removes the lowest-saliency group(s), updates,
and repeats, recording the weight and the cumulative error at the requested levels: the per-layer
error database the latency search chooses from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from obert_modifiers.errors import ObertError

__all__ = [
    "StructuredOBSError",
    "InputHessian",
    "damped_hessian",
    "group_columns",
    "group_saliency",
    "remove_columns",
    "reconstruction_error",
    "zero_columns",
    "optimal_weight",
    "OBSDatabase",
    "structured_obs",
    "input_hessians",
]

DEFAULT_REL_DAMP = 0.01


class StructuredOBSError(ObertError, ValueError):
    """A structured OBS input is inconsistent (the message names the argument and what is expected)."""


class InputHessian:
    """Running ``H = 2 X^T X / N`` of a linear layer's inputs over calibration batches.

    ``add`` takes inputs of any leading shape (``[batch, seq, cols]`` from a hook) and keeps the mean
    exact across batches of different sizes (``H <- H n/(n+b) + 2 X^T X/(n+b)``), accumulating in
    ``dtype`` (float32 by default, as the reference code; float64 for tests)."""

    def __init__(self, columns: int, *, dtype: torch.dtype = torch.float32, device=None) -> None:
        if columns <= 0:
            raise StructuredOBSError(f"InputHessian: columns must be positive, got {columns}")
        self.columns = columns
        self.count = 0
        self.hessian = torch.zeros(columns, columns, dtype=dtype, device=device)

    @torch.no_grad()
    def add(self, inputs: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch of inputs; ``mask`` (the leading shape of ``inputs``, true = real token) drops
        padding positions so they do not dilute the statistics."""
        if inputs.shape[-1] != self.columns:
            raise StructuredOBSError(
                f"InputHessian.add: inputs have {inputs.shape[-1]} columns, the Hessian has {self.columns}"
            )
        x = inputs.detach().reshape(-1, self.columns)
        if mask is not None:
            x = x[mask.reshape(-1).to(torch.bool)]
        batch = x.shape[0]
        if batch == 0:
            return
        if self.count == 0 and x.device != self.hessian.device:
            self.hessian = self.hessian.to(x.device)  # accumulate where the activations are (GPU)
        x = x.to(device=self.hessian.device, dtype=self.hessian.dtype)
        total = self.count + batch
        self.hessian.mul_(self.count / total)
        self.hessian.addmm_(x.T, x, alpha=2.0 / total)
        self.count = total

    def all_reduce(self) -> None:
        """Average over the ranks of an initialised ``torch.distributed`` group (weighted by tokens), so
        every rank prunes the same way; a no-op outside distributed runs."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        weighted = self.hessian * self.count
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.hessian.device)
        dist.all_reduce(weighted)
        dist.all_reduce(count)
        self.count = int(count.item())
        self.hessian = weighted / max(self.count, 1)

    def matrix(self, rel_damp: float = DEFAULT_REL_DAMP) -> Tensor:
        """The damped Hessian (a copy): see :func:`damped_hessian`."""
        if self.count == 0:
            raise StructuredOBSError("InputHessian.matrix: no inputs were added (calibration saw no tokens)")
        return damped_hessian(self.hessian, rel_damp)


def damped_hessian(hessian: Tensor, rel_damp: float = DEFAULT_REL_DAMP) -> Tensor:
    """``H + rel_damp * mean(diag H) * I``, with dead inputs (``H_jj == 0``) given ``H_jj = 1`` first so the
    matrix is invertible (their columns carry nothing, so they are free to remove)."""
    if rel_damp < 0:
        raise StructuredOBSError(f"rel_damp must be >= 0, got {rel_damp}")
    h = hessian.clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += rel_damp * diag.mean()
    return h


def group_columns(groups: Tensor | Sequence[int], group_size: int) -> Tensor:
    """Column indices of the given groups (group ``g`` is columns ``[g*size, (g+1)*size)``)."""
    g = torch.as_tensor(groups, dtype=torch.long).reshape(-1, 1)
    return (g * group_size + torch.arange(group_size, device=g.device).reshape(1, -1)).reshape(-1)


def _spd_inverse(matrix: Tensor) -> Tensor:
    """Inverse of a (batch of) symmetric positive-definite matrices, through Cholesky."""
    return torch.cholesky_inverse(torch.linalg.cholesky(matrix))


def group_saliency(weight: Tensor, hinv: Tensor, group_size: int, alive: Tensor | None = None) -> Tensor:
    """``eps_g = tr(W_g (Hi_gg)^-1 W_g^T)`` for every group of ``group_size`` adjacent columns ([G]).

    Groups not ``alive`` score ``inf`` (already removed). The diagonal blocks of ``Hi`` are inverted
    as one batch ``[G, size, size]``."""
    rows, cols = weight.shape
    if cols % group_size:
        raise StructuredOBSError(f"the weight has {cols} columns, not a multiple of group_size {group_size}")
    num_groups = cols // group_size
    if group_size == 1:
        scores = (weight**2).sum(0) / torch.diagonal(hinv)
    else:
        blocks = hinv.reshape(num_groups, group_size, num_groups, group_size)
        blocks = blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, size, size]
        w = weight.reshape(rows, num_groups, group_size).permute(1, 0, 2)  # [G, rows, size]
        solved = w @ _spd_inverse(blocks)
        scores = (solved * w).sum((1, 2))
    if alive is not None:
        scores = torch.where(alive, scores, torch.full_like(scores, float("inf")))
    return scores


@torch.no_grad()
def remove_columns(weight: Tensor, hinv: Tensor, columns: Tensor) -> float:
    """Remove ``columns`` jointly with the OBS update, in place on ``weight`` and ``hinv``.

    Returns ``eps_M`` (the loss rises by ``eps_M / 2``). Afterwards ``weight[:, M]`` is exactly 0,
    the other columns compensate optimally, and ``hinv`` is the inverse Hessian of the remaining
    columns (with an identity block on ``M`` so later block inverses stay defined)."""
    m = columns
    w_m = weight[:, m]
    rows_m = hinv[m, :]  # [|M|, cols]
    block_inv = _spd_inverse(rows_m[:, m])
    lam = w_m @ block_inv  # [rows, |M|]
    eps = float((lam * w_m).sum())
    weight.addmm_(lam, rows_m, alpha=-1.0)  # in place: no rows x cols temporary per step
    weight[:, m] = 0.0
    hinv.addmm_(rows_m.T, block_inv @ rows_m, alpha=-1.0)
    hinv[m, :] = 0.0
    hinv[:, m] = 0.0
    hinv[m, m] = 1.0
    return eps


def reconstruction_error(weight: Tensor, new_weight: Tensor, hessian: Tensor) -> float:
    """``1/2 tr(dW H dW^T)``: with ``H = 2 X^T X / N`` the mean squared change of the layer's output."""
    dw = (weight - new_weight).to(hessian.dtype)
    return float(0.5 * ((dw @ hessian) * dw).sum())


def optimal_weight(
    weight: Tensor, hessian: Tensor, kept_columns: Tensor | Sequence[int], rel_damp: float = DEFAULT_REL_DAMP
) -> Tensor:
    """The best weight on ``kept_columns`` (the others removed) in closed form, ``W H[:, K] H[K, K]^-1``
    with the damped Hessian: what the greedy OBS steps reach for that removed set, so a database need
    not store weights (``store_weights=False``) for levels only the chosen one of which is used."""
    h = damped_hessian(hessian, rel_damp)
    kept = torch.as_tensor(kept_columns, dtype=torch.long, device=h.device)
    w = weight.detach().to(h.dtype).clone()
    w[:, torch.diagonal(hessian) == 0] = 0.0
    rhs = w @ h[:, kept]  # [rows, K]
    chol = torch.linalg.cholesky(h[kept][:, kept])
    solved = torch.cholesky_solve(rhs.T, chol).T
    return solved.to(weight.dtype)


def zero_columns(weight: Tensor, columns: Tensor | Sequence[int]) -> Tensor:
    """A copy of ``weight`` with ``columns`` set to 0 and nothing else changed (removal without update)."""
    out = weight.clone()
    out[:, torch.as_tensor(columns, dtype=torch.long)] = 0.0
    return out


@dataclass
class OBSDatabase:
    """Greedy structured OBS of one layer: what is removed at each level and what it costs.

    ``order`` is the removal order of the groups (the first ``k`` are gone at level ``k``).
    ``errors[k]`` is the cumulative ``sum eps / 2`` at level ``k`` (= ``1/2 tr(dW H dW^T)`` with the
    damped ``H``), ``energy`` is ``1/2 tr(W H W^T)``, the error of removing everything, used to
    compare layers of different scale. ``weights[k]`` is the OBS-updated weight restricted to the
    kept columns (in their original order), stored for the recorded levels only."""

    group_size: int
    num_groups: int
    order: list[int]
    errors: dict[int, float]
    energy: float
    weights: dict[int, Tensor] = field(default_factory=dict)

    @property
    def levels(self) -> list[int]:
        """Recorded levels (groups removed), ascending."""
        return sorted(self.errors)

    def kept_groups(self, level: int) -> list[int]:
        """The groups still alive after ``level`` removals, ascending."""
        self._check(level)
        return sorted(set(range(self.num_groups)) - set(self.order[:level]))

    def kept_columns(self, level: int) -> Tensor:
        """Input columns kept at ``level`` (ascending)."""
        return group_columns(self.kept_groups(level), self.group_size)

    def weight(self, level: int, *, full: bool = False) -> Tensor:
        """The OBS-updated weight at ``level``: kept columns only, or (``full``) zeros elsewhere."""
        self._check(level)
        if level not in self.weights:
            raise StructuredOBSError(f"level {level} was scored but its weight was not stored")
        kept = self.weights[level]
        if not full:
            return kept
        out = kept.new_zeros(kept.shape[0], self.num_groups * self.group_size)
        out[:, self.kept_columns(level)] = kept
        return out

    def relative_errors(self) -> dict[int, float]:
        """``errors[k] / energy``: comparable across layers (1.0 = the layer's output is gone)."""
        scale = self.energy if self.energy > 0 else 1.0
        return {k: v / scale for k, v in self.errors.items()}

    def by_kept(self, relative: bool = False) -> dict[int, float]:
        """Errors keyed by the number of groups kept (what the latency table is keyed by)."""
        errors = self.relative_errors() if relative else self.errors
        return {self.num_groups - k: v for k, v in errors.items()}

    def _check(self, level: int) -> None:
        if level not in self.errors:
            raise StructuredOBSError(f"level {level} is not in the database (levels {self.levels})")


def _validate_levels(levels: Iterable[int] | None, num_groups: int) -> list[int]:
    if levels is None:
        return list(range(num_groups + 1))
    out = sorted({int(k) for k in levels} | {0})
    bad = [k for k in out if not 0 <= k <= num_groups]
    if bad:
        raise StructuredOBSError(f"levels {bad} are outside 0..{num_groups} (groups that can be removed)")
    return out


@torch.no_grad()
def structured_obs(
    weight: Tensor,
    hessian: Tensor,
    group_size: int,
    levels: Iterable[int] | None = None,
    *,
    rel_damp: float = DEFAULT_REL_DAMP,
    chunk: int = 1,
    store_weights: bool = True,
    dtype: torch.dtype | None = None,
) -> OBSDatabase:
    """Greedy structured OBS: remove the lowest-saliency group, update weights and inverse, repeat.

    ``weight`` is ``[rows, cols]`` with ``cols = G * group_size``; ``hessian`` the undamped input
    Hessian (``InputHessian.hessian``), damped here by ``rel_damp``. ``levels`` (numbers of groups
    removed; default every level 0..G) are where the database records errors and weights.
    ``chunk`` > 1 removes up to that many lowest-saliency groups jointly per update (exact joint
    update, greedy choice by single saliencies; it never jumps over a level), trading a little
    accuracy for speed on wide layers (FFN: 16 neurons). Computed in ``dtype`` (default: the
    Hessian's). Dead inputs (zero Hessian diagonal) are zeroed in the weight before scoring."""
    if weight.dim() != 2:
        raise StructuredOBSError(f"weight must be 2-D [rows, cols], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise StructuredOBSError(f"hessian must be [{cols}, {cols}] for a weight {tuple(weight.shape)}")
    if group_size <= 0 or cols % group_size:
        raise StructuredOBSError(f"group_size {group_size} must divide the {cols} input columns")
    if chunk < 1:
        raise StructuredOBSError(f"chunk must be >= 1, got {chunk}")
    num_groups = cols // group_size
    levels = _validate_levels(levels, num_groups)
    dtype = dtype or hessian.dtype
    h = damped_hessian(hessian.to(dtype), rel_damp)
    w = weight.detach().to(dtype).clone()
    w[:, torch.diagonal(hessian) == 0] = 0.0  # dead inputs contribute nothing; removing them is free
    energy = 0.5 * float(((w @ h) * w).sum())
    hinv = _spd_inverse(h)

    alive = torch.ones(num_groups, dtype=torch.bool, device=w.device)
    order: list[int] = []
    errors: dict[int, float] = {0: 0.0}
    weights: dict[int, Tensor] = {0: w.to(weight.dtype).clone()} if store_weights else {}
    cumulative = 0.0
    for target in levels[1:]:
        while len(order) < target:
            step = min(chunk, target - len(order))
            scores = group_saliency(w, hinv, group_size, alive)
            chosen = torch.argsort(scores, stable=True)[:step]
            cumulative += 0.5 * remove_columns(w, hinv, group_columns(chosen, group_size).to(w.device))
            alive[chosen] = False
            order.extend(int(g) for g in chosen)
        errors[target] = cumulative
        if store_weights:
            kept = group_columns(sorted(set(range(num_groups)) - set(order)), group_size).to(w.device)
            weights[target] = w[:, kept].to(weight.dtype).clone()
    return OBSDatabase(group_size, num_groups, order, errors, energy, weights)


@contextmanager
def input_hessians(
    modules: Mapping[str, nn.Linear],
    *,
    dtype: torch.dtype = torch.float32,
    mask: Callable[[], Tensor | None] | None = None,
) -> Iterator[dict[str, InputHessian]]:
    """Within the block, every forward of each named linear adds its input to an :class:`InputHessian`.

    ``mask`` returns the current batch's token mask (e.g. ``lambda: batch["attention_mask"]``), so
    padding tokens do not count; a mask whose shape is not the input's leading shape is an error.
    Yields ``{name: InputHessian}``; the hooks are removed on exit."""
    hessians = {name: InputHessian(module.in_features, dtype=dtype) for name, module in modules.items()}
    handles = []
    for name, module in modules.items():

        def hook(_module, args, _name=name):
            inputs = args[0]
            current = mask() if mask is not None else None
            if current is not None and tuple(current.shape) != tuple(inputs.shape[:-1]):
                raise StructuredOBSError(
                    f"input_hessians: the mask is {tuple(current.shape)} but {_name}'s input is "
                    f"{tuple(inputs.shape)}; the mask must cover its leading dimensions"
                )
            hessians[_name].add(inputs, current)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield hessians
    finally:
        for handle in handles:
            handle.remove()
