"""Block-diagonal empirical Fisher inverse for the Optimal BERT Surgeon (pure torch).

The empirical Fisher of a flat weight vector w (d entries) over m gradients g_1..g_m is

    F = damp * I + (1/m) * sum_i g_i g_i^T

and oBERT (Kurtic et al. 2022, arXiv:2203.07259) keeps only its B x B blocks along the diagonal
(``fisher_block_size`` B). SparseML builds the inverse of each block with m successive
Sherman-Morrison (rank-1 Woodbury) updates of a dense [d/B, B, B] tensor: every gradient reads and
writes the whole O(d*B) state, three passes per gradient.

Here the same inverse is computed in two batched phases:

1. accumulation: gradients are copied into a small [chunk, d] buffer; every ``chunk`` gradients
   the buffer is folded into the per-block Gram matrices ``sum g g^T`` with one batched matmul per
   slice of blocks (a rank-``chunk`` Woodbury-style update of the statistics, so the O(d*B) state is
   touched once per chunk instead of three times per gradient);
2. inversion: ``damp*I + Gram/m`` is inverted block by block with a batched Cholesky in float64
   (Jacobi-scaled batched Cholesky, float64 where float32 fails; no drift from m chained rank-1
   updates).

The symmetric blocks are stored packed (upper triangle, B(B+1)/2 numbers per block), which halves
the state: total memory is about ``d * ((B + 1) / 2 + chunk) * 4`` bytes (see ``state_bytes``).
Statistics can be summed over DDP ranks (``all_reduce``) so every rank inverts the same matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "BlockFisherInverse",
    "LowRankFisherInverse",
    "make_fisher",
    "restore_fisher",
    "fisher_state_bytes",
    "workspace_bytes",
    "padded_numel",
    "packed_size",
    "state_bytes",
    "symmetric_index",
    "dense_fisher_inverse",
]

# slice of blocks processed at once in batched ops; bounds the temporary [slice, B, B] tensors
# (5 MB each at B = 50 and 512 blocks: cache-friendly; measured as fast as 2048, the fold faster)
DEFAULT_BLOCK_SLICE = 512


def padded_numel(numel: int, block_size: int) -> int:
    """Length of a flat parameter padded with zeros to a whole number of Fisher blocks."""
    return math.ceil(numel / block_size) * block_size


def packed_size(block_size: int) -> int:
    """Numbers stored per symmetric B x B block (its upper triangle)."""
    return block_size * (block_size + 1) // 2


def state_bytes(numel: int, block_size: int, chunk_size: int, element_bytes: int = 4) -> int:
    """Memory held by a ``BlockFisherInverse`` over ``numel`` weights (packed blocks + buffer)."""
    padded = padded_numel(numel, block_size)
    blocks = padded // block_size
    return element_bytes * (blocks * packed_size(block_size) + chunk_size * padded)


def spd_inverse(matrices: Tensor) -> Tensor:
    """Inverses of a batch of symmetric positive definite float32 matrices.

    Jacobi-scaled (unit diagonal, which removes the 1/damp vs O(1) spread of the entries) and
    Cholesky-inverted in float32 (about 3x faster than float64 LAPACK on CPU); matrices whose
    float32 factorisation fails are redone in float64."""
    scale = matrices.diagonal(dim1=1, dim2=2).rsqrt()
    outer = scale.unsqueeze(2) * scale.unsqueeze(1)
    factor, info = torch.linalg.cholesky_ex(matrices * outer)
    failed = torch.nonzero(info).flatten()
    if failed.numel():  # placeholder factors (cholesky_inverse rejects a zero pivot), redone below
        factor[failed] = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    inverse = torch.cholesky_inverse(factor) * outer
    if failed.numel():
        inverse[failed] = torch.linalg.inv(matrices[failed].double()).to(matrices.dtype)
    return inverse


def spd_solve(matrices: Tensor, rhs: Tensor) -> Tensor:
    """Solve SPD systems [n, B, B] x = rhs [n, B] (float32, Jacobi-scaled Cholesky; float64 for the
    systems whose float32 factorisation fails)."""
    scale = matrices.diagonal(dim1=1, dim2=2).rsqrt()
    scaled = matrices * (scale.unsqueeze(2) * scale.unsqueeze(1))
    factor, info = torch.linalg.cholesky_ex(scaled)
    failed = torch.nonzero(info).flatten()
    if failed.numel():  # placeholder factors, redone in float64 below
        factor[failed] = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    x = torch.cholesky_solve((rhs * scale).unsqueeze(-1), factor).squeeze(-1) * scale
    if failed.numel():
        x[failed] = torch.linalg.solve(matrices[failed].double(), rhs[failed].double()).to(x.dtype)
    return x


_INDEX_CACHE: dict = {}


def symmetric_index(block_size: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(unpack, pack) index tensors for packed symmetric blocks.

    ``unpack`` is [B*B]: position in the packed row of entry (r, c) (the same for (c, r)), so
    ``packed[:, unpack].view(-1, B, B)`` rebuilds the full blocks. ``pack`` is [B(B+1)/2]: the flat
    positions r*B + c (r <= c) of the upper triangle, so ``full.view(n, -1)[:, pack]`` packs."""
    key = (block_size, str(device))
    if key not in _INDEX_CACHE:
        rows, cols = torch.triu_indices(block_size, block_size)
        pack = rows * block_size + cols
        lookup = torch.empty(block_size, block_size, dtype=torch.long)
        positions = torch.arange(rows.numel())
        lookup[rows, cols] = positions
        lookup[cols, rows] = positions
        _INDEX_CACHE[key] = (lookup.reshape(-1).to(device), pack.to(device))
    return _INDEX_CACHE[key]


def _block_offsets(numels: Sequence[int], block_size: int) -> list:
    """First block of each parameter (each padded to whole blocks), then the total block count."""
    offsets = [0]
    for numel in numels:
        offsets.append(offsets[-1] + padded_numel(numel, block_size) // block_size)
    return offsets


def _write_gradient_row(
    row: Tensor,
    grads: Sequence[Tensor | None],
    masks: Sequence[Tensor | None] | None,
    numels: Sequence[int],
    offsets: Sequence[int],
    block_size: int,
) -> None:
    """Copy one gradient sample (one tensor per parameter) into a flat row laid out by ``offsets``;
    pruned weights (``mask == 0``) and missing gradients are written as zeros."""
    if len(grads) != len(numels):
        raise ValueError(f"expected {len(numels)} gradients, got {len(grads)}")
    for index, grad in enumerate(grads):
        start = offsets[index] * block_size
        target = row[start : start + numels[index]]
        if grad is None:
            target.zero_()
            continue
        target.copy_(grad.reshape(-1))
        mask = masks[index] if masks is not None else None
        if mask is not None:
            target.mul_(mask.reshape(-1).to(target.dtype))


class BlockFisherInverse:
    """Block-diagonal empirical Fisher (then its inverse) for a group of flat parameters.

    Each parameter is padded separately to a multiple of ``block_size`` so that no block spans two
    parameters (as in SparseML). Usage::

        fisher = BlockFisherInverse([p.numel() for p in params], block_size=50)
        for each sampled gradient: fisher.add_gradient([p.grad for p in params], masks)
        fisher.all_reduce()            # under torch.distributed: sum statistics over ranks
        fisher.invert(damp=1e-7)       # now holds the inverse
        fisher.diag(i), fisher.blocks(i, start, stop), ...
    """

    def __init__(
        self,
        numels: Sequence[int],
        block_size: int,
        *,
        chunk_size: int = 8,
        device: torch.device | None = None,
        block_slice: int = DEFAULT_BLOCK_SLICE,
        allocate: bool = True,
    ):
        if block_size < 1:
            raise ValueError(f"fisher_block_size must be >= 1, got {block_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.block_size = block_size
        self.numels = [int(n) for n in numels]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.block_slice = block_slice
        self.chunk_size = chunk_size
        self.block_offsets = _block_offsets(self.numels, block_size)
        self.num_blocks = self.block_offsets[-1]
        self.packed = None
        self._buffer = None
        if allocate:  # restore_fisher() builds without state, then loads a spilled one
            self.packed = torch.zeros(self.num_blocks, packed_size(block_size), device=self.device)
            self._buffer = torch.zeros(chunk_size, self.num_blocks * block_size, device=self.device)
        self._filled = 0
        self.num_grads = 0
        self.inverted = False
        self._unpack, self._pack = symmetric_index(block_size, self.device)

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def add_gradient(self, grads: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None) -> None:
        """Add one gradient sample (one tensor per parameter, any shape). Pruned weights
        (``mask == 0``) get a zero gradient, so their Fisher rows decouple."""
        if self.inverted:
            raise RuntimeError("BlockFisherInverse already inverted; create a new one for new gradients")
        row = self._buffer[self._filled]
        _write_gradient_row(row, grads, masks, self.numels, self.block_offsets, self.block_size)
        self._filled += 1
        self.num_grads += 1
        if self._filled == self.chunk_size:
            self._flush()

    def _flush(self) -> None:
        count = self._filled
        if count == 0:
            return
        block = self.block_size
        grads = self._buffer[:count].view(count, self.num_blocks, block)
        for start in range(0, self.num_blocks, self.block_slice):
            stop = min(start + self.block_slice, self.num_blocks)
            g = grads[:, start:stop, :].transpose(0, 1)  # [slice, count, B]
            outer = torch.bmm(g.transpose(1, 2), g)  # sum over the chunk of g g^T: [slice, B, B]
            self.packed[start:stop].add_(outer.reshape(stop - start, -1).index_select(1, self._pack))
        self._filled = 0

    def finish(self) -> None:
        """Fold any buffered gradients into the statistics and free the buffer."""
        self._flush()
        self._buffer = None

    def all_reduce(self) -> None:
        """Sum the statistics and gradient counts over torch.distributed ranks (no-op without)."""
        self.finish()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() < 2:
            return
        torch.distributed.all_reduce(self.packed)
        count = torch.tensor([float(self.num_grads)], device=self.device)
        torch.distributed.all_reduce(count)
        self.num_grads = int(round(count.item()))

    # ------------------------------------------------------------------ inversion
    @torch.no_grad()
    def invert(self, damp: float) -> None:
        """Replace the statistics by the inverse of ``damp*I + Gram/num_grads``, block by block."""
        if self.inverted:
            return
        self.finish()
        if self.num_grads < 1:
            raise RuntimeError("no gradients were added to the Fisher estimate")
        if damp <= 0:
            raise ValueError(f"damp must be > 0, got {damp}")
        eye = torch.eye(self.block_size, device=self.device)
        for start in range(0, self.num_blocks, self.block_slice):
            stop = min(start + self.block_slice, self.num_blocks)
            fisher = self._unpacked(start, stop)
            fisher.div_(self.num_grads).add_(eye, alpha=damp)
            inverse = spd_inverse(fisher)
            self.packed[start:stop] = inverse.reshape(stop - start, -1).index_select(1, self._pack)
        self.inverted = True

    # ------------------------------------------------------------------ access
    def _unpacked(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> Tensor:
        rows = self.packed[start:stop].index_select(1, self._unpack)
        return rows.to(dtype).view(stop - start, self.block_size, self.block_size)

    def blocks(self, index: int, start: int = 0, stop: int | None = None, dtype=torch.float32) -> Tensor:
        """Full [n, B, B] blocks ``start:stop`` of parameter ``index`` (unpacked copy)."""
        first, last = self.block_offsets[index], self.block_offsets[index + 1]
        stop = last - first if stop is None else stop
        return self._unpacked(first + start, first + stop, dtype)

    def blocks_at(self, index: int, rows: Tensor, dtype=torch.float32) -> Tensor:
        """Full [len(rows), B, B] blocks of parameter ``index`` at block indices ``rows``."""
        packed = self.packed.index_select(0, rows + self.block_offsets[index])
        return packed.index_select(1, self._unpack).to(dtype).view(-1, self.block_size, self.block_size)

    def param_num_blocks(self, index: int) -> int:
        return self.block_offsets[index + 1] - self.block_offsets[index]

    def diag(self, index: int) -> Tensor:
        """Diagonal of the (inverse) Fisher for parameter ``index``: flat, ``numel`` long."""
        first, last = self.block_offsets[index], self.block_offsets[index + 1]
        positions = self._unpack.view(self.block_size, self.block_size).diagonal()
        return self.packed[first:last].index_select(1, positions).reshape(-1)[: self.numels[index]]

    def diag_subblocks(self, index: int, group: int) -> Tensor:
        """The [numel/group, group, group] diagonal sub-blocks over each run of ``group``
        consecutive weights of parameter ``index`` (``group`` must divide the block size)."""
        if self.block_size % group:
            raise ValueError(f"group {group} must divide fisher_block_size {self.block_size}")
        lookup = self._unpack.view(self.block_size, self.block_size)
        starts = torch.arange(0, self.block_size, group, device=self.device)
        offsets = torch.arange(group, device=self.device)
        rows = (starts[:, None] + offsets[None, :])[:, :, None]  # [B/g, g, 1]
        cols = (starts[:, None] + offsets[None, :])[:, None, :]  # [B/g, 1, g]
        positions = lookup[rows, cols].reshape(-1)  # [B/g * g * g]
        first, last = self.block_offsets[index], self.block_offsets[index + 1]
        sub = self.packed[first:last].index_select(1, positions).view(-1, group, group)
        return sub[: self.numels[index] // group]

    def spill_state(self) -> dict:
        return {"packed": self.packed, "num_grads": self.num_grads}

    def load_spilled(self, state: dict) -> None:
        self.packed = state["packed"]
        self.num_grads = state["num_grads"]
        self.inverted = True

    def release(self) -> None:
        self.packed = None
        self._buffer = None


def dense_fisher_inverse(grads: Tensor, damp: float) -> Tensor:
    """Reference: the inverse of ``damp*I + (1/m) G^T G`` for grads [m, n] (float64, dense)."""
    grads = grads.double()
    m, n = grads.shape
    return torch.linalg.inv(damp * torch.eye(n, dtype=torch.float64) + grads.T @ grads / m)


class LowRankFisherInverse:
    """The same block-diagonal inverse, kept implicit, for few gradients (m < B).

    With G_b the [B, m] gradients of block b, ``F_b = damp*I + G_b G_b^T / m`` and (Woodbury)

        F_b^-1 = (1/damp) * (I - G_b K_b^-1 G_b^T),    K_b = m*damp*I + G_b^T G_b   (m x m)

    so only the gradients (m numbers per weight) and the Cholesky factors of the small K_b are
    stored, and every product costs O(B*m) instead of O(B^2) per block. Used when the total number
    of gradients is at most B/4 (see :func:`use_low_rank`); the dense :class:`BlockFisherInverse`
    is used otherwise. Same interface."""

    def __init__(
        self,
        numels: Sequence[int],
        block_size: int,
        num_grads: int,
        *,
        device: torch.device | None = None,
        block_slice: int = DEFAULT_BLOCK_SLICE,
        allocate: bool = True,
    ):
        self.block_size = block_size
        self.numels = [int(n) for n in numels]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.block_slice = block_slice
        self.block_offsets = _block_offsets(self.numels, block_size)
        self.num_blocks = self.block_offsets[-1]
        self.grads = (
            torch.zeros(num_grads, self.num_blocks * block_size, device=self.device) if allocate else None
        )
        self.factors: Tensor | None = None
        self.rows = 0  # gradient rows held
        self.num_grads = 0  # gradients they represent (the 1/m of the Fisher)
        self.damp = None
        self.inverted = False
        self._unpack, self._pack = symmetric_index(block_size, self.device)

    @staticmethod
    def state_bytes(numel: int, block_size: int, num_grads: int) -> int:
        padded = padded_numel(numel, block_size)
        return 4 * num_grads * padded + 8 * (padded // block_size) * num_grads**2

    @torch.no_grad()
    def add_gradient(self, grads: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None) -> None:
        if self.rows >= self.grads.shape[0]:
            raise RuntimeError(f"LowRankFisherInverse holds at most {self.grads.shape[0]} gradients")
        row = self.grads[self.rows]
        _write_gradient_row(row, grads, masks, self.numels, self.block_offsets, self.block_size)
        self.rows += 1
        self.num_grads += 1

    def finish(self) -> None:
        if self.rows < self.grads.shape[0]:
            self.grads = self.grads[: self.rows].clone()

    def all_reduce(self) -> None:
        """Gather every rank's gradients so all ranks hold the same G. A rank with fewer gradients
        pads with zero rows, which change nothing (the normalisation uses the true count)."""
        self.finish()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world < 2:
            return
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        torch.distributed.all_gather(counts, torch.tensor([self.rows], dtype=torch.long))
        most = max(int(c) for c in counts)
        local = self.grads
        if local.shape[0] < most:
            local = torch.cat([local, local.new_zeros(most - local.shape[0], local.shape[1])])
        parts = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(parts, local.contiguous())
        self.grads = torch.cat(parts)
        self.rows = self.grads.shape[0]
        self.num_grads = sum(int(c) for c in counts)

    def _block_grads(self, rows: Tensor) -> Tensor:
        """[len(rows), B, m] float64 gradients of the given global block indices."""
        view = self.grads.view(self.grads.shape[0], self.num_blocks, self.block_size)
        return view.index_select(1, rows).permute(1, 2, 0).double()

    @torch.no_grad()
    def invert(self, damp: float) -> None:
        if self.inverted:
            return
        self.finish()
        if self.num_grads < 1:
            raise RuntimeError("no gradients were added to the Fisher estimate")
        if damp <= 0:
            raise ValueError(f"damp must be > 0, got {damp}")
        self.damp = float(damp)
        m = self.grads.shape[0]  # rows held (>= num_grads under DDP padding)
        identity = torch.eye(m, dtype=torch.float64, device=self.device)
        eye = identity * (self.num_grads * self.damp)
        self.factors = torch.empty(self.num_blocks, m, m, dtype=torch.float64, device=self.device)
        for start in range(0, self.num_blocks, self.block_slice):
            rows = torch.arange(start, min(start + self.block_slice, self.num_blocks), device=self.device)
            g = self._block_grads(rows)
            factor = torch.linalg.cholesky(g.transpose(1, 2) @ g + eye)
            # keep L^-1 (K = L L^T): then K^-1 products are plain batched matmuls
            self.factors[rows] = torch.linalg.solve_triangular(
                factor, identity.expand_as(factor), upper=False
            )
        self.inverted = True

    def _slices(self, index: int):
        first, last = self.block_offsets[index], self.block_offsets[index + 1]
        for start in range(first, last, self.block_slice):
            yield torch.arange(start, min(start + self.block_slice, last), device=self.device)

    def _whitened(self, rows: Tensor) -> Tensor:
        """W = L^-1 G^T [r, m, B] for the given block rows, so that F^-1 = (I - W^T W) / damp."""
        return self.factors[rows] @ self._block_grads(rows).transpose(1, 2)

    def diag(self, index: int) -> Tensor:
        out = []
        for rows in self._slices(index):
            w = self._whitened(rows)
            out.append(((1.0 - (w * w).sum(1)) / self.damp).reshape(-1))
        return torch.cat(out)[: self.numels[index]].float()

    def diag_subblocks(self, index: int, group: int) -> Tensor:
        if self.block_size % group:
            raise ValueError(f"group {group} must divide fisher_block_size {self.block_size}")
        per_block = self.block_size // group
        eye = torch.eye(group, dtype=torch.float64, device=self.device)
        out = []
        for rows in self._slices(index):
            w = self._whitened(rows)  # [r, m, B]
            runs = w.view(w.shape[0], w.shape[1], per_block, group).permute(0, 2, 3, 1)  # [r, B/N, N, m]
            sub = (eye - runs @ runs.transpose(-1, -2)) / self.damp
            out.append(sub.reshape(-1, group, group))
        return torch.cat(out)[: self.numels[index] // group]

    def blocks_at(self, index: int, rows: Tensor, dtype=torch.float32) -> Tensor:
        w = self._whitened(rows + self.block_offsets[index])
        eye = torch.eye(self.block_size, dtype=torch.float64, device=self.device)
        return ((eye - w.transpose(1, 2) @ w) / self.damp).to(dtype)

    def blocks(self, index: int, start: int = 0, stop: int | None = None, dtype=torch.float32) -> Tensor:
        count = self.block_offsets[index + 1] - self.block_offsets[index]
        stop = count if stop is None else stop
        return self.blocks_at(index, torch.arange(start, stop, device=self.device), dtype)

    @torch.no_grad()
    def obs_update(self, index: int, weights: Tensor, prune: Tensor, rows: Tensor) -> Tensor:
        """Joint OBS update dw [r, B] for parameter-local block ``rows`` with weights/prune [r, B],
        all through m x m solves: ([F^-1]_QQ)^-1 = damp * (I + G_Q S^-1 G_Q^T), S = K - G_Q^T G_Q."""
        g = self._block_grads(rows + self.block_offsets[index])  # [r, B, m]
        q = prune.to(torch.bool)
        w = weights.double() * q
        g_q = g * q.unsqueeze(-1)
        g_r = g - g_q
        m = g.shape[-1]
        s = g_r.transpose(1, 2) @ g_r + torch.eye(m, dtype=torch.float64, device=self.device) * (
            self.num_grads * self.damp
        )
        t = g_q.transpose(1, 2) @ w.unsqueeze(-1)  # [r, m, 1]
        u = torch.cholesky_solve(t, torch.linalg.cholesky(s))
        x = (w.unsqueeze(-1) + g_q @ u).squeeze(-1) * q  # x / damp, zero off Q
        inv_factor = self.factors[rows + self.block_offsets[index]]  # L^-1
        k_inv_gt_x = inv_factor.transpose(1, 2) @ (inv_factor @ (g.transpose(1, 2) @ x.unsqueeze(-1)))
        return -(x - (g @ k_inv_gt_x).squeeze(-1)).to(weights.dtype)

    def spill_state(self) -> dict:
        return {"grads": self.grads, "factors": self.factors, "damp": self.damp, "num_grads": self.num_grads}

    def load_spilled(self, state: dict) -> None:
        self.grads, self.factors, self.damp = state["grads"], state["factors"], state["damp"]
        self.num_grads = state["num_grads"]
        self.rows = self.grads.shape[0]
        self.inverted = True

    def release(self) -> None:
        self.grads = None
        self.factors = None


def use_low_rank(num_grads: int, block_size: int) -> bool:
    """Few gradients (m <= B/4): keeping them (O(d*m) memory, O(d*m^2) work) is cheaper than dense
    blocks (O(d*B) memory, O(d*B^2) work); measured on CPU, the O(m^2) float64 work per weight
    overtakes the dense path's LAPACK calls from about m = B/2."""
    return num_grads <= block_size // 4


def fisher_state_bytes(numel: int, block_size: int, chunk_size: int, num_grads: int) -> int:
    """Memory of the Fisher state :func:`make_fisher` builds for ``numel`` weights."""
    if use_low_rank(num_grads, block_size):
        return LowRankFisherInverse.state_bytes(numel, block_size, num_grads)
    return state_bytes(numel, block_size, chunk_size)


def make_fisher(
    numels: Sequence[int],
    block_size: int,
    *,
    local_grads: int,
    total_grads: int,
    chunk_size: int,
    block_slice: int = DEFAULT_BLOCK_SLICE,
):
    """The Fisher estimate for a group: low-rank (Woodbury) form for few gradients, dense otherwise."""
    if use_low_rank(total_grads, block_size):
        return LowRankFisherInverse(numels, block_size, local_grads, block_slice=block_slice)
    return BlockFisherInverse(numels, block_size, chunk_size=chunk_size, block_slice=block_slice)


def restore_fisher(
    numels: Sequence[int], block_size: int, state: dict, *, block_slice: int = DEFAULT_BLOCK_SLICE
):
    """An inverted Fisher rebuilt from ``spill_state()`` without allocating a second state first."""
    if "packed" in state:
        fisher = BlockFisherInverse(numels, block_size, chunk_size=1, block_slice=block_slice, allocate=False)
    else:
        fisher = LowRankFisherInverse(numels, block_size, 1, block_slice=block_slice, allocate=False)
    fisher.load_spilled(state)
    return fisher


def workspace_bytes(block_size: int, block_slice: int, *, num_grads: int, chunk_size: int) -> int:
    """Upper estimate of the transient memory of one batched slice of ``block_slice`` blocks in the
    heaviest phase (gradient fold, inversion, scores or OBS update) of the form :func:`make_fisher`
    picks. The dense form holds up to about nine [slice, B, B] float32 temporaries at once in the
    joint OBS update (masked system, Jacobi scaling, Cholesky factor, the unpacked inverse, ...);
    the low-rank form up to about eight [slice, B, m] float64 ones plus [slice, m, m] factors."""
    block = block_size
    if use_low_rank(num_grads, block_size):
        m = num_grads
        return block_slice * (8 * 8 * block * m + 4 * 8 * m * m + 4 * 8 * block)
    fold = 4 * block_slice * (block * block + packed_size(block) + 2 * chunk_size * block)
    update = 4 * block_slice * (9 * block * block + packed_size(block) + 4 * block)
    return max(fold, update)
