"""Optimal Brain Surgeon saliencies, weight updates and the oBERT pruning step (pure torch).

With the (block-diagonal) inverse Fisher F^-1, removing a set Q of weights and letting the others
move optimally raises the quadratic loss model by

    rho_Q = 1/2 * w_Q^T ([F^-1]_QQ)^-1 w_Q,     with the update  dw = -F^-1 e_Q ([F^-1]_QQ)^-1 w_Q

(Hassibi & Stork 1993; Kurtic et al. 2022, eqs. 3-5). For one weight (unstructured) the saliency is
w^2 / (2 [F^-1]_ii); for ``mask_type: blockN`` Q is a run of N consecutive weights. The update here
is the joint one over all pruned weights of each Fisher block (SparseML sums per-weight / per-group
updates instead, ignoring the correlations between weights pruned in the same block).

``memory_budget_gb`` (:func:`plan_memory`): everything the step allocates is charged phase by phase
against 90 % of the budget, and the weights are treated in groups (parameters split at Fisher-block
boundaries), one set of gradient passes each; masks come from the scores of all groups at once,
so they equal the unbudgeted step's.
"""

from __future__ import annotations

import ctypes
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from obert_modifiers.algorithms.fisher import (
    DEFAULT_BLOCK_SLICE,
    BlockFisherInverse,
    fisher_state_bytes,
    make_fisher,
    padded_numel,
    restore_fisher,
    spd_solve,
    state_bytes,
    use_low_rank,
    workspace_bytes,
)
from obert_modifiers.algorithms.sparsity import (
    expand_group_mask,
    recomputation_targets,
    select_keep_masks,
)

__all__ = [
    "EPS",
    "unstructured_saliency",
    "block_saliency",
    "obs_update_blocks",
    "apply_obs_update",
    "Segment",
    "MemoryPlan",
    "BUDGET_HEADROOM",
    "estimate_group_bytes",
    "minimum_budget_bytes",
    "plan_memory",
    "PruneStepStats",
    "obs_prune_step",
    "parse_mask_type",
]

# SparseML adds float32 eps to the denominator of the unstructured saliency; kept for agreement
EPS = torch.finfo(torch.float32).eps


def parse_mask_type(mask_type: str) -> int:
    """'unstructured' -> 1, 'block4' -> 4, 'blockN' -> N; ValueError otherwise."""
    if mask_type == "unstructured":
        return 1
    if mask_type.startswith("block") and mask_type[5:].isdigit() and int(mask_type[5:]) >= 2:
        return int(mask_type[5:])
    raise ValueError(
        f"mask_type must be 'unstructured' or 'blockN' (N >= 2, e.g. 'block4'), got {mask_type!r}"
    )


def unstructured_saliency(weight: Tensor, finv_diag: Tensor) -> Tensor:
    """w^2 / (2 [F^-1]_ii) for flat weights and the flat diagonal of F^-1."""
    return weight.reshape(-1).float() ** 2 / (2.0 * finv_diag + EPS)


def block_saliency(weight: Tensor, finv_subblocks: Tensor) -> Tensor:
    """1/2 w_g^T ([F^-1]_gg)^-1 w_g for each run g of N consecutive weights.

    ``finv_subblocks`` is [numel/N, N, N] (``BlockFisherInverse.diag_subblocks``); returns
    [numel/N] scores."""
    group = finv_subblocks.shape[-1]
    w = weight.reshape(-1, group).double()
    solved = torch.linalg.solve(finv_subblocks.double(), w.unsqueeze(-1)).squeeze(-1)
    return (0.5 * (w * solved).sum(-1)).float()


def obs_update_blocks(finv_blocks: Tensor, weights: Tensor, prune: Tensor) -> Tensor:
    """Joint OBS update per Fisher block: for blocks [n, B, B], weights [n, B] and a boolean prune
    set [n, B] returns dw [n, B] = -F^-1 e_Q ([F^-1]_QQ)^-1 w_Q (so w + dw is 0 on Q).

    Computed in the dtype of ``finv_blocks``: float64 exactly (LU), float32 with a Jacobi-scaled
    Cholesky (the system is SPD) that falls back to float64 where float32 fails."""
    dtype = finv_blocks.dtype
    finv = finv_blocks
    w = weights.to(dtype)
    q = prune.to(torch.bool)
    pair = (q.unsqueeze(2) & q.unsqueeze(1)).to(dtype)
    # [F^-1]_QQ on the pruned coordinates, identity elsewhere: the solution is 0 off Q
    system = finv * pair + torch.diag_embed((~q).to(dtype))
    rhs = w * q.to(dtype)
    if dtype == torch.float64:
        x = torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1)
    else:
        x = spd_solve(system, rhs)
    return -(finv @ x.unsqueeze(-1)).squeeze(-1).to(weights.dtype)


@torch.no_grad()
def apply_obs_update(
    fisher: BlockFisherInverse,
    index: int,
    weight: Tensor,
    keep: Tensor,
    block_slice: int = DEFAULT_BLOCK_SLICE,
) -> None:
    """Update ``weight`` (parameter ``index`` of ``fisher``, inverted) in place with the joint OBS
    update for the weights where ``keep`` is False, and set those exactly to zero."""
    block = fisher.block_size
    numel = weight.numel()
    padded = padded_numel(numel, block)
    flat_w = torch.zeros(padded, dtype=torch.float32, device=weight.device)
    flat_w[:numel] = weight.detach().reshape(-1).float()
    flat_prune = torch.zeros(padded, dtype=torch.bool, device=weight.device)
    flat_prune[:numel] = ~keep.reshape(-1).bool()
    w_blocks = flat_w.view(-1, block)
    q_blocks = flat_prune.view(-1, block)
    active = torch.nonzero(q_blocks.any(dim=1)).flatten()  # only blocks that prune something
    for start in range(0, active.numel(), block_slice):
        rows = active[start : start + block_slice]
        if hasattr(fisher, "obs_update"):  # low-rank form: m x m solves
            w_blocks[rows] += fisher.obs_update(index, w_blocks[rows], q_blocks[rows], rows)
        else:
            finv = fisher.blocks_at(index, rows)
            w_blocks[rows] += obs_update_blocks(finv, w_blocks[rows], q_blocks[rows])
    flat_w[flat_prune] = 0.0
    weight.data.copy_(flat_w[:numel].view_as(weight).to(weight.dtype))


@dataclass(frozen=True)
class Segment:
    """Weights ``start:stop`` of the flattened parameter ``param``. ``start`` is a multiple of the
    Fisher block size, so a parameter split into segments has the same blocks as a whole one."""

    param: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass
class MemoryPlan:
    """How one pruning step walks its parameters: ``groups`` of segments, each with its own gradient
    passes and Fisher state, the gradient-buffer ``chunk_size``, the ``block_slice`` of the batched
    linear algebra, and the planner's estimate of the step's peak extra memory."""

    groups: list
    chunk_size: int
    block_slice: int
    estimate_bytes: int
    budget_bytes: int | None = None


# share of the budget left unplanned: the gradient passes' activations (the model's, not the step's
# data; a few MB at batch 1) and allocator slack
BUDGET_HEADROOM = 0.10
# share of the budget the temporaries of one batched slice of Fisher blocks may take
WORKSPACE_SHARE = 0.05


def default_chunk_size(block_size: int, num_grads: int) -> int:
    """Gradients folded into the Fisher statistics at once without a budget."""
    return max(1, min(16, block_size // 4 or 1, num_grads))


def _held_bytes(numel: int, block_size: int, num_grads: int) -> int:
    """Fisher state left after the gradient passes (the dense form drops its gradient buffer)."""
    if use_low_rank(num_grads, block_size):
        return fisher_state_bytes(numel, block_size, 1, num_grads)
    return state_bytes(numel, block_size, 0)


def _selection_bytes(num_scores: int) -> int:
    """Transients of choosing the masks from all scores (``select_keep_masks``): their
    concatenation and the k-th value search's copy (float32 each), comparison and keep masks (bool)
    and an int64 count over a bool mask; measured 16 bytes per score (torch 2.13, CPU)."""
    return num_scores * 17


def estimate_group_bytes(
    segments: Sequence[Segment],
    numels: Sequence[int],
    *,
    block_size: int,
    num_grads: int,
    chunk_size: int,
    block_slice: int,
    mask_group: int = 1,
) -> int:
    """Peak extra memory of treating one group of segments, phase by phase, on top of the scores
    of all weights (1 float32 per weight or per blockN run) that live through the whole step:

    - gradient passes: Fisher state with its gradient buffer, the weight gradients (``.grad``) of
      every parameter the group touches (whole parameters, even when only a segment is used), and
      the fold workspace;
    - inversion: inverse (packed blocks) + workspace of one slice of blocks;
    - scores: inverse + a few float32 copies of the largest segment (diagonal, w^2, result);
    - OBS update: inverse + float32/bool copies of the segment + workspace.
    """
    resident = 4 * (sum(numels) // mask_group)
    touched = {s.param for s in segments}
    state = sum(fisher_state_bytes(s.numel, block_size, chunk_size, num_grads) for s in segments)
    held = sum(_held_bytes(s.numel, block_size, num_grads) for s in segments)
    blocks = sum(padded_numel(s.numel, block_size) // block_size for s in segments)
    work = workspace_bytes(block_size, min(block_slice, blocks), num_grads=num_grads, chunk_size=chunk_size)
    largest = max(padded_numel(s.numel, block_size) for s in segments)
    passes = state + 4 * sum(numels[p] for p in touched) + work
    invert = held + work
    scores = held + 5 * 4 * largest
    update = held + (4 + 1 + 1) * largest + work
    return resident + max(passes, invert, scores, update)


def _pack_groups(numels, usable, **sizes) -> list | None:
    """Greedy: fill each group with whole parameters, in order, splitting a parameter at a block
    boundary when the rest does not fit; None when not even one block fits an empty group."""
    block = sizes["block_size"]
    groups: list = []
    current: list = []
    for index, numel in enumerate(numels):
        start = 0
        while start < numel:
            blocks_left = -(-(numel - start) // block)

            def fits(count: int, start=start, numel=numel, index=index, current=current) -> bool:
                segment = Segment(index, start, min(numel, start + count * block))
                return estimate_group_bytes([*current, segment], numels, **sizes) <= usable

            if fits(blocks_left):
                count = blocks_left
            else:  # largest count that fits: fits(low) holds (or low == 0), fits(high) does not
                low, high = 0, blocks_left
                while high - low > 1:
                    middle = (low + high) // 2
                    low, high = (middle, high) if fits(middle) else (low, middle)
                count = low
            if count == 0:
                if not current:
                    return None
                groups.append(current)
                current = []
                continue
            segment = Segment(index, start, min(numel, start + count * block))
            current.append(segment)
            start = segment.stop
            if start < numel:  # the group is full
                groups.append(current)
                current = []
    if current:
        groups.append(current)
    return groups


def minimum_budget_bytes(
    numels: Sequence[int], *, block_size: int, num_grads: int, mask_group: int = 1
) -> int:
    """The smallest budget :func:`plan_memory` accepts: one Fisher block at a time of the parameter
    whose gradient is largest, with the scores of all weights (one gradient pass per block, so
    only useful as a floor)."""
    sizes = dict(
        block_size=block_size, num_grads=num_grads, chunk_size=1, block_slice=1, mask_group=mask_group
    )
    worst = max(
        estimate_group_bytes([Segment(i, 0, min(n, block_size))], numels, **sizes)
        for i, n in enumerate(numels)
    )
    total_scores = sum(numels) // mask_group
    worst = max(worst, 4 * total_scores + _selection_bytes(total_scores))
    return math.ceil(worst / (1.0 - BUDGET_HEADROOM))


def plan_memory(
    numels: Sequence[int],
    *,
    block_size: int,
    num_grads: int,
    budget_bytes: int | None = None,
    mask_group: int = 1,
    chunk_size: int | None = None,
) -> MemoryPlan:
    """Plan one pruning step over parameters of ``numels`` weights (``num_grads`` gradients in
    total). Without a budget: one group of whole parameters. With one: groups (parameters split at
    block boundaries where needed) whose estimated peak (:func:`estimate_group_bytes`) stays within
    ``(1 - BUDGET_HEADROOM) * budget_bytes``, the fewest groups possible (each costs one set of
    gradient passes), then the largest gradient buffer that keeps that number. Raises ValueError
    naming ``memory_budget_gb`` and the smallest feasible budget when the budget is too small."""
    numels = [int(n) for n in numels]
    total_scores = sum(numels) // mask_group

    def sizes(chunk: int, block_slice: int) -> dict:
        return dict(
            block_size=block_size,
            num_grads=num_grads,
            chunk_size=chunk,
            block_slice=block_slice,
            mask_group=mask_group,
        )

    if budget_bytes is None:
        chunk = chunk_size or default_chunk_size(block_size, num_grads)
        groups = [[Segment(i, 0, n) for i, n in enumerate(numels)]]
        estimate = estimate_group_bytes(groups[0], numels, **sizes(chunk, DEFAULT_BLOCK_SLICE))
        estimate = max(estimate, 4 * total_scores + _selection_bytes(total_scores))
        return MemoryPlan(groups, chunk, DEFAULT_BLOCK_SLICE, estimate)
    usable = int(budget_bytes * (1.0 - BUDGET_HEADROOM))
    minimum = minimum_budget_bytes(numels, block_size=block_size, num_grads=num_grads, mask_group=mask_group)
    too_small = ValueError(
        f"memory_budget_gb={budget_bytes / 2**30:.4g} is too small for {len(numels)} parameter(s) of "
        f"{sum(numels)} weights at fisher_block_size={block_size}, num_grads={num_grads}: the "
        f"smallest feasible budget is {minimum / 2**30:.4g} GB (scores of all weights, the largest "
        f"gradient and one Fisher block at a time); set memory_budget_gb >= {minimum / 2**30:.4g}"
    )
    per_block = workspace_bytes(block_size, 1, num_grads=num_grads, chunk_size=1)
    block_slice = max(1, min(DEFAULT_BLOCK_SLICE, int(WORKSPACE_SHARE * budget_bytes) // per_block))
    if 4 * total_scores + _selection_bytes(total_scores) > usable:
        raise too_small
    largest_chunk = chunk_size or default_chunk_size(block_size, num_grads)
    best = None
    for chunk in [chunk_size] if chunk_size else range(1, largest_chunk + 1):
        groups = _pack_groups(numels, usable, **sizes(chunk, block_slice))
        if groups is None:
            if best is None:
                raise too_small
            break
        if best is not None and len(groups) > len(best[0]):
            break
        best = (groups, chunk)
    groups, chunk = best
    estimate = max(estimate_group_bytes(g, numels, **sizes(chunk, block_slice)) for g in groups)
    estimate = max(estimate, 4 * total_scores + _selection_bytes(total_scores))
    return MemoryPlan(groups, chunk, block_slice, estimate, budget_bytes)


@dataclass
class PruneStepStats:
    targets: list = field(default_factory=list)
    achieved: float = 0.0
    per_param_sparsity: list = field(default_factory=list)
    grad_seconds: float = 0.0
    fisher_seconds: float = 0.0
    inverse_seconds: float = 0.0
    score_seconds: float = 0.0
    update_seconds: float = 0.0
    num_grads: int = 0
    num_groups: int = 0
    state_bytes: int = 0  # the largest group's Fisher state (with its gradient buffer)
    estimate_bytes: int = 0  # the planner's estimate of the step's peak extra memory
    budget_bytes: int | None = None


def _world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


_MALLOC_TRIM = None


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps freed blocks below its (adaptive, up to
    32 MB) mmap threshold for reuse; under a budget that slack would sit next to the next group's
    freshly mapped Fisher state and count in the peak."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


@torch.no_grad()
def _scores_for(fisher: BlockFisherInverse, index: int, weight: Tensor, keep: Tensor, group: int) -> Tensor:
    if group == 1:
        scores = unstructured_saliency(weight, fisher.diag(index))
        scores[~keep.reshape(-1)] = -math.inf  # pruned weights stay pruned
        return scores
    scores = block_saliency(weight, fisher.diag_subblocks(index, group))
    group_keep = keep.reshape(-1, group).all(dim=1)
    scores[~group_keep] = -math.inf
    return scores


def obs_prune_step(
    params: Sequence[Tensor],
    keep_masks: Sequence[Tensor],
    target: Sequence[float],
    sample_gradients: Callable[[int], Iterable],
    *,
    num_grads: int,
    damp: float,
    fisher_block_size: int,
    mask_type: str = "unstructured",
    global_sparsity: bool = True,
    num_recomputations: int = 1,
    last_sparsity: Sequence[float] | None = None,
    memory_budget_gb: float | None = None,
    chunk_size: int | None = None,
    other_params: Sequence[Tensor] = (),
    spill_dir: str | None = None,
) -> PruneStepStats:
    """One oBERT pruning step: prune ``params`` to ``target`` sparsity (one value per parameter)
    in ``num_recomputations`` jumps, each with a fresh Fisher inverse and an OBS weight update.

    ``sample_gradients(n)`` must run n forward/backward passes, yielding after each one with the
    gradients in ``p.grad`` (SparseML's ``GradSampler.iter_module_backwards`` does exactly this).
    ``keep_masks`` (bool, True = keep) are updated in place, as are the weights. Under
    torch.distributed every rank samples ``ceil(num_grads / world)`` gradients and the Fisher
    statistics are summed, so every rank computes the same masks and weights.

    With ``memory_budget_gb`` the step is planned by :func:`plan_memory`: groups of parameters
    (split at Fisher-block boundaries where needed) are treated in turn, each with its own gradient
    passes (only its weights get gradients) and, when there are several, its inverse kept in a
    temporary file until the masks are chosen from the scores of all groups. Masks and weights are
    those of the unbudgeted step; the cost is one set of ``num_grads`` passes per group."""
    group = parse_mask_type(mask_type)
    if fisher_block_size % group:
        raise ValueError(f"fisher_block_size {fisher_block_size} must be a multiple of the {mask_type} size")
    for p in params:
        if p.numel() % group:
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} is not divisible into {mask_type} groups"
            )
    rank, world = _world()
    budget = None if memory_budget_gb is None else int(memory_budget_gb * 2**30)
    numels = [p.numel() for p in params]
    local_grads = math.ceil(num_grads / world)
    total_grads = local_grads * world
    plan = plan_memory(
        numels,
        block_size=fisher_block_size,
        num_grads=total_grads,
        budget_bytes=budget,
        mask_group=group,
        chunk_size=chunk_size,
    )
    stats = PruneStepStats(
        num_groups=len(plan.groups), estimate_bytes=plan.estimate_bytes, budget_bytes=budget
    )
    stats.state_bytes = max(
        sum(fisher_state_bytes(s.numel, fisher_block_size, plan.chunk_size, total_grads) for s in g)
        for g in plan.groups
    )
    last = list(last_sparsity) if last_sparsity is not None else [_mask_sparsity(m) for m in keep_masks]
    plans = [recomputation_targets(a, b, num_recomputations) for a, b in zip(last, target, strict=False)]
    for step in range(num_recomputations):
        step_target = [schedule[step] for schedule in plans]
        _one_recomputation(
            params,
            keep_masks,
            step_target,
            sample_gradients,
            plan,
            stats,
            local_grads=local_grads,
            damp=damp,
            block_size=fisher_block_size,
            group=group,
            global_sparsity=global_sparsity,
            other_params=other_params,
            spill_dir=spill_dir,
        )
    if world > 1:  # bit-identical state on every rank whatever the floating-point history
        for p, m in zip(params, keep_masks, strict=False):
            torch.distributed.broadcast(p.data, src=0)
            as_bytes = m.to(torch.uint8)
            torch.distributed.broadcast(as_bytes, src=0)
            m.copy_(as_bytes.bool())
    stats.targets = list(target)
    stats.per_param_sparsity = [_mask_sparsity(m) for m in keep_masks]
    total = sum(numels)
    stats.achieved = (
        sum(s * n for s, n in zip(stats.per_param_sparsity, numels, strict=False)) / total if total else 0.0
    )
    return stats


def _mask_sparsity(mask: Tensor) -> float:
    # count_nonzero, not sum: summing a bool mask makes an int64 copy of it (8 bytes per weight)
    return 1.0 - int(torch.count_nonzero(mask)) / mask.numel() if mask.numel() else 0.0


def _flat(tensor: Tensor) -> Tensor:
    """Flat view of a parameter's data or a mask (a copy only for a non-contiguous tensor)."""
    return tensor.detach().reshape(-1)


def _collect(
    fisher: BlockFisherInverse,
    params: Sequence[Tensor],
    keep_masks: Sequence[Tensor],
    segments: Sequence[Segment],
    sample_gradients: Callable[[int], Iterable],
    count: int,
    frozen: Sequence[Tensor],
    stats: PruneStepStats,
) -> None:
    """Run the gradient passes for one group, feeding the Fisher and freeing gradients early."""
    members = [params[i] for i in dict.fromkeys(s.param for s in segments)]
    masks = [_flat(keep_masks[s.param])[s.start : s.stop] for s in segments]
    was_trainable = [p.requires_grad for p in frozen]
    for p in frozen:  # no weight gradients outside the group: less time and memory
        p.requires_grad_(False)
    try:
        begin = time.perf_counter()
        fisher_time = 0.0
        for _ in sample_gradients(count):
            tick = time.perf_counter()
            grads = [
                None if params[s.param].grad is None else params[s.param].grad.reshape(-1)[s.start : s.stop]
                for s in segments
            ]
            fisher.add_gradient(grads, masks)
            del grads
            for p in members:
                p.grad = None
            fisher_time += time.perf_counter() - tick
        tick = time.perf_counter()
        fisher.all_reduce()
        fisher_time += time.perf_counter() - tick
        stats.grad_seconds += time.perf_counter() - begin - fisher_time
        stats.fisher_seconds += fisher_time
        stats.num_grads = fisher.num_grads
    finally:
        for p, flag in zip(frozen, was_trainable, strict=False):
            p.requires_grad_(flag)


def _one_recomputation(
    params,
    keep_masks,
    step_target,
    sample_gradients,
    plan: MemoryPlan,
    stats: PruneStepStats,
    *,
    local_grads,
    damp,
    block_size,
    group,
    global_sparsity,
    other_params,
    spill_dir,
) -> None:
    """Fisher, inverse and scores group by group; then the masks from all scores at once (so a
    global threshold sees every weight, exactly as without groups); then the OBS updates group by
    group, each group's inverse read back from disk when there are several groups."""
    world = _world()[1]
    budgeted = plan.budget_bytes is not None
    several = len(plan.groups) > 1
    scores: list = []  # one tensor per segment, segments in parameter order
    kept = None
    spilled: list = []
    tmp = None
    all_trainable = list(params) + list(other_params)
    try:
        for g_index, segments in enumerate(plan.groups):
            member_ids = {id(params[s.param]) for s in segments}
            # only this group's weight gradients are needed: the backward skips every other weight
            frozen = [p for p in all_trainable if id(p) not in member_ids]
            fisher = make_fisher(
                [s.numel for s in segments],
                block_size,
                local_grads=local_grads,
                total_grads=local_grads * world,
                chunk_size=plan.chunk_size,
                block_slice=plan.block_slice,
            )
            _collect(fisher, params, keep_masks, segments, sample_gradients, local_grads, frozen, stats)
            if budgeted:  # the freed gradients and gradient buffer
                _return_freed_memory()
            tick = time.perf_counter()
            fisher.invert(damp)
            stats.inverse_seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            for local, s in enumerate(segments):
                weight = _flat(params[s.param])[s.start : s.stop]
                keep = _flat(keep_masks[s.param])[s.start : s.stop]
                scores.append(_scores_for(fisher, local, weight, keep, group))
            stats.score_seconds += time.perf_counter() - tick
            if not several:
                kept = fisher
                continue
            # the masks need every group's scores: park this group's inverse on disk meanwhile
            if tmp is None:
                tmp = tempfile.TemporaryDirectory(prefix="obert-fisher-", dir=spill_dir)
            path = os.path.join(tmp.name, f"group{g_index}.pt")
            torch.save(fisher.spill_state(), path)
            fisher.release()
            del fisher
            spilled.append(path)
            if budgeted:
                _return_freed_memory()
        keeps = _select(scores, plan, step_target, global_sparsity, len(params))
        del scores
        if budgeted:
            _return_freed_memory()
        position = 0
        for g_index, segments in enumerate(plan.groups):
            if kept is not None:
                fisher, kept = kept, None
            else:
                state = torch.load(spilled[g_index], weights_only=False)
                fisher = restore_fisher(
                    [s.numel for s in segments], block_size, state, block_slice=plan.block_slice
                )
                del state
                os.remove(spilled[g_index])
            _apply_group(
                fisher, segments, params, keep_masks, keeps[position : position + len(segments)], group, stats
            )
            position += len(segments)
            fisher.release()
            del fisher
            if budgeted:
                _return_freed_memory()
    finally:
        if tmp is not None:
            tmp.cleanup()


def _select(scores: list, plan: MemoryPlan, step_target, global_sparsity: bool, num_params: int) -> list:
    """Keep masks (flat, over weights or blockN runs) for every segment, in segment order."""
    segments = [s for g in plan.groups for s in g]
    if global_sparsity:
        return select_keep_masks(scores, [step_target[s.param] for s in segments], True)
    per_param: list = [[] for _ in range(num_params)]
    for s, score in zip(segments, scores, strict=True):
        per_param[s.param].append(score)
    joined = [torch.cat(parts) if len(parts) != 1 else parts[0] for parts in per_param]
    keeps_per_param = select_keep_masks(joined, step_target, False)
    keeps, used = [], [0] * num_params
    for s, score in zip(segments, scores, strict=True):
        keeps.append(keeps_per_param[s.param][used[s.param] : used[s.param] + score.numel()])
        used[s.param] += score.numel()
    return keeps


def _apply_group(fisher, segments, params, keep_masks, keeps, group, stats) -> None:
    tick = time.perf_counter()
    for local, (s, keep_runs) in enumerate(zip(segments, keeps, strict=True)):
        weight, mask = params[s.param], keep_masks[s.param]
        flat_weight, flat_mask = weight.data.reshape(-1), mask.reshape(-1)
        keep = expand_group_mask(keep_runs, group, (s.numel,)) if group > 1 else keep_runs
        apply_obs_update(fisher, local, flat_weight[s.start : s.stop], keep, block_slice=fisher.block_slice)
        flat_mask[s.start : s.stop].copy_(keep)
        if flat_weight.data_ptr() != weight.data.data_ptr():  # non-contiguous: reshape copied
            weight.data.copy_(flat_weight.view_as(weight))
        if flat_mask.data_ptr() != mask.data_ptr():
            mask.copy_(flat_mask.view_as(mask))
    stats.update_seconds += time.perf_counter() - tick
