"""Optimal Brain Surgeon saliencies, weight updates and the oBERT pruning step (pure torch).

With the (block-diagonal) inverse Fisher F^-1, removing a set Q of weights and letting the others
move optimally raises the quadratic loss model by

    rho_Q = 1/2 * w_Q^T ([F^-1]_QQ)^-1 w_Q,     with the update  dw = -F^-1 e_Q ([F^-1]_QQ)^-1 w_Q

(Hassibi & Stork 1993; Kurtic et al. 2022, eqs. 3-5). For one weight (unstructured) the saliency is
w^2 / (2 [F^-1]_ii); for ``mask_type: blockN`` Q is a run of N consecutive weights. The update here
is the joint one over all pruned weights of each Fisher block (SparseML sums per-weight / per-group
updates instead, ignoring the correlations between weights pruned in the same block).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from obert_modifiers.algorithms.fisher import (
    BlockFisherInverse,
    fisher_state_bytes,
    make_fisher,
    padded_numel,
    spd_solve,
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
    "plan_groups",
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
    fisher: BlockFisherInverse, index: int, weight: Tensor, keep: Tensor, block_slice: int = 2048
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


def plan_groups(
    numels: Sequence[int], block_size: int, chunk_size: int, budget_bytes: int | None, num_grads: int = 10**9
) -> list:
    """Split parameters (in order) into groups whose Fisher state fits ``budget_bytes``
    (one group when there is no budget). Raises if one parameter alone does not fit."""
    if budget_bytes is None:
        return [list(range(len(numels)))]
    groups, current, used = [], [], 0
    for index, numel in enumerate(numels):
        need = fisher_state_bytes(numel, block_size, chunk_size, num_grads)
        if need > budget_bytes:
            raise ValueError(
                f"memory_budget_gb={budget_bytes / 2**30:.3g} is too small: parameter #{index} "
                f"({numel} weights) alone needs {need / 2**30:.3g} GB of Fisher state at "
                f"fisher_block_size={block_size}"
            )
        if current and used + need > budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += need
    if current:
        groups.append(current)
    return groups


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
    state_bytes: int = 0


def _world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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

    With ``memory_budget_gb`` the parameters are treated in groups whose Fisher state fits the
    budget: one gradient pass per group (other weights get no gradient during it) and, for global
    sparsity, the group's inverse is kept on disk until the global threshold is known."""
    group = parse_mask_type(mask_type)
    if fisher_block_size % group:
        raise ValueError(f"fisher_block_size {fisher_block_size} must be a multiple of the {mask_type} size")
    for p in params:
        if p.numel() % group:
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} is not divisible into {mask_type} groups"
            )
    rank, world = _world()
    chunk = chunk_size or max(1, min(16, fisher_block_size // 4 or 1, num_grads))
    budget = None if memory_budget_gb is None else int(memory_budget_gb * 2**30)
    numels = [p.numel() for p in params]
    local_grads = math.ceil(num_grads / world)
    total_grads = local_grads * world
    if budget is not None and chunk_size is None:
        # a tight budget shrinks the gradient buffer (fewer gradients per batched update) first
        largest = max(numels)
        while chunk > 1 and fisher_state_bytes(largest, fisher_block_size, chunk, total_grads) > budget:
            chunk -= 1
    groups = plan_groups(numels, fisher_block_size, chunk, budget, total_grads)
    stats = PruneStepStats(num_groups=len(groups))
    stats.state_bytes = max(
        sum(fisher_state_bytes(numels[i], fisher_block_size, chunk, total_grads) for i in g) for g in groups
    )
    last = list(last_sparsity) if last_sparsity is not None else [_mask_sparsity(m) for m in keep_masks]
    plans = [recomputation_targets(a, b, num_recomputations) for a, b in zip(last, target, strict=False)]
    for step in range(num_recomputations):
        step_target = [plan[step] for plan in plans]
        _one_recomputation(
            params,
            keep_masks,
            step_target,
            sample_gradients,
            groups,
            stats,
            local_grads=local_grads,
            damp=damp,
            block_size=fisher_block_size,
            group=group,
            global_sparsity=global_sparsity,
            chunk=chunk,
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
    return 1.0 - float(mask.sum()) / mask.numel() if mask.numel() else 0.0


def _collect(
    fisher: BlockFisherInverse,
    members: Sequence[Tensor],
    member_masks: Sequence[Tensor],
    sample_gradients: Callable[[int], Iterable],
    count: int,
    frozen: Sequence[Tensor],
    stats: PruneStepStats,
) -> None:
    """Run the gradient passes for one group, feeding the Fisher and freeing gradients early."""
    was_trainable = [p.requires_grad for p in frozen]
    for p in frozen:  # no weight gradients outside the group: less time and memory
        p.requires_grad_(False)
    try:
        begin = time.perf_counter()
        fisher_time = 0.0
        for _ in sample_gradients(count):
            tick = time.perf_counter()
            fisher.add_gradient([p.grad for p in members], member_masks)
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
    groups,
    stats,
    *,
    local_grads,
    damp,
    block_size,
    group,
    global_sparsity,
    chunk,
    other_params,
    spill_dir,
) -> None:
    world = _world()[1]
    total_grads = local_grads * world
    scores: list = [None] * len(params)
    kept: dict = {}
    spilled: dict = {}
    tmp = None
    all_trainable = list(params) + list(other_params)
    for g_index, members_idx in enumerate(groups):
        members = [params[i] for i in members_idx]
        member_ids = {id(p) for p in members}
        # only this group's weight gradients are needed: the backward skips every other weight
        frozen = [p for p in all_trainable if id(p) not in member_ids]
        fisher = make_fisher(
            [params[i].numel() for i in members_idx],
            block_size,
            local_grads=local_grads,
            total_grads=local_grads * world,
            chunk_size=chunk,
        )
        _collect(
            fisher,
            members,
            [keep_masks[i] for i in members_idx],
            sample_gradients,
            local_grads,
            frozen,
            stats,
        )
        tick = time.perf_counter()
        fisher.invert(damp)
        stats.inverse_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        for local, i in enumerate(members_idx):
            scores[i] = _scores_for(fisher, local, params[i].detach(), keep_masks[i], group)
        stats.score_seconds += time.perf_counter() - tick
        if len(groups) == 1 or not global_sparsity:
            if not global_sparsity:  # layer-wise: this group can be finished right away
                _finish_group(
                    fisher, members_idx, params, keep_masks, scores, step_target, False, group, stats
                )
                fisher.release()
            else:
                kept[g_index] = fisher
        else:  # global threshold needs every group's scores: park the inverse on disk
            if tmp is None:
                tmp = tempfile.TemporaryDirectory(prefix="obert-fisher-", dir=spill_dir)
            path = os.path.join(tmp.name, f"group{g_index}.pt")
            torch.save(fisher.spill_state(), path)
            fisher.release()
            spilled[g_index] = path
    try:
        if not global_sparsity:
            return
        keeps = select_keep_masks(scores, step_target, True)
        for g_index, members_idx in enumerate(groups):
            if g_index in kept:
                fisher = kept.pop(g_index)
            else:
                fisher = make_fisher(
                    [params[i].numel() for i in members_idx],
                    block_size,
                    local_grads=1,
                    total_grads=total_grads,
                    chunk_size=1,
                )
                fisher.finish()
                fisher.load_spilled(torch.load(spilled[g_index], weights_only=False))
                os.remove(spilled[g_index])
            _apply_group(fisher, members_idx, params, keep_masks, keeps, group, stats)
            fisher.release()
    finally:
        if tmp is not None:
            tmp.cleanup()


def _finish_group(
    fisher, members_idx, params, keep_masks, scores, step_target, global_sparsity, group, stats
):
    keeps = select_keep_masks(
        [scores[i] for i in members_idx], [step_target[i] for i in members_idx], global_sparsity
    )
    full = [None] * len(params)
    for local, i in enumerate(members_idx):
        full[i] = keeps[local]
    _apply_group(fisher, members_idx, params, keep_masks, full, group, stats)


def _apply_group(fisher, members_idx, params, keep_masks, keeps, group, stats) -> None:
    tick = time.perf_counter()
    for local, i in enumerate(members_idx):
        weight = params[i]
        keep = expand_group_mask(keeps[i], group, weight.shape) if group > 1 else keeps[i].view(weight.shape)
        apply_obs_update(fisher, local, weight, keep)
        keep_masks[i].copy_(keep)
    stats.update_seconds += time.perf_counter() - tick
