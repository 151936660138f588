"""The block Fisher inverse equals the direct inverse of (damp*I + (1/m) sum g g^T) per block."""

from __future__ import annotations

import pytest
import torch

from obert_modifiers.algorithms.fisher import (
    BlockFisherInverse,
    dense_fisher_inverse,
    packed_size,
    state_bytes,
)


def _reference_blocks(grads: torch.Tensor, numel: int, block: int, damp: float) -> list:
    """Per-block direct inverses for one parameter (grads [m, numel]), zero-padded at the end."""
    padded = -(-numel // block) * block
    full = torch.zeros(grads.shape[0], padded, dtype=torch.float64)
    full[:, :numel] = grads.double()
    return [dense_fisher_inverse(full[:, s : s + block], damp) for s in range(0, padded, block)]


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("num_grads,chunk", [(5, 2), (24, 8), (7, 16)])
def test_inverse_matches_direct_inverse(num_grads, chunk):
    torch.manual_seed(0)
    numels, block, damp = [30, 17], 8, 1e-3
    grads = [torch.randn(num_grads, n) * 0.1 for n in numels]
    fisher = BlockFisherInverse(numels, block, chunk_size=chunk, block_slice=3)
    for i in range(num_grads):
        fisher.add_gradient([g[i].view(-1) for g in grads])
    fisher.invert(damp)
    assert fisher.num_grads == num_grads
    for index, n in enumerate(numels):
        expected = torch.stack(_reference_blocks(grads[index], n, block, damp))
        got = fisher.blocks(index, dtype=torch.float64)
        assert got.shape == expected.shape
        # float32 statistics and float32 (Jacobi-scaled) Cholesky: float32-level agreement
        assert _relative_error(got, expected) < 1e-4
        diag = expected.diagonal(dim1=1, dim2=2).reshape(-1)[:n]
        assert _relative_error(fisher.diag(index).double(), diag) < 1e-4


def test_masked_gradients_decouple_pruned_weights():
    torch.manual_seed(1)
    block, damp = 4, 1e-2
    mask = torch.tensor([1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    fisher = BlockFisherInverse([8], block, chunk_size=3)
    grads = torch.randn(6, 8)
    for g in grads:
        fisher.add_gradient([g], [mask])
    fisher.invert(damp)
    blocks = fisher.blocks(0, dtype=torch.float64)
    # pruned coordinates have zero gradient: their row of the inverse is e_i / damp
    assert blocks[0, 1, 1].item() == pytest.approx(1 / damp, rel=1e-5)
    assert blocks[0, 1].abs().sum().item() == pytest.approx(1 / damp, rel=1e-5)
    expected = _reference_blocks(grads * mask, 8, block, damp)
    assert _relative_error(blocks, torch.stack(expected)) < 1e-4


def test_subblocks_are_the_diagonal_groups():
    torch.manual_seed(2)
    fisher = BlockFisherInverse([16], 8, chunk_size=4)
    for g in torch.randn(9, 16):
        fisher.add_gradient([g])
    fisher.invert(1e-2)
    full = fisher.blocks(0)
    sub = fisher.diag_subblocks(0, 4)
    assert sub.shape == (4, 4, 4)
    torch.testing.assert_close(sub[1], full[0, 4:8, 4:8])
    torch.testing.assert_close(sub[2], full[1, 0:4, 0:4])


def test_state_is_packed_half_of_dense():
    # packed symmetric blocks: B(B+1)/2 numbers per block instead of B*B
    assert packed_size(50) == 1275
    dense = 1000 * 50 * 4
    assert state_bytes(1000, 50, chunk_size=0 or 1) < 0.6 * dense


def test_errors_are_clear():
    fisher = BlockFisherInverse([4], 2)
    with pytest.raises(RuntimeError, match="no gradients"):
        fisher.invert(1e-3)
    with pytest.raises(ValueError, match="fisher_block_size"):
        BlockFisherInverse([4], 0)


def test_low_rank_form_equals_dense_blocks():
    """Few gradients (m <= B/4): the implicit Woodbury form gives the same inverse, diagonal,
    sub-blocks and joint OBS update as the dense blocks."""
    from obert_modifiers.algorithms.fisher import LowRankFisherInverse, make_fisher
    from obert_modifiers.algorithms.obs import obs_update_blocks

    torch.manual_seed(3)
    numels, block, damp, m = [40, 20], 16, 1e-4, 4
    grads = [torch.randn(m, n) * 0.1 for n in numels]
    mask = torch.rand(40) > 0.2
    dense = BlockFisherInverse(numels, block, chunk_size=4)
    low = make_fisher(numels, block, local_grads=m, total_grads=m, chunk_size=4)
    assert isinstance(low, LowRankFisherInverse)
    for i in range(m):
        for fisher in (dense, low):
            fisher.add_gradient([grads[0][i], grads[1][i]], [mask, None])
    dense.invert(damp)
    low.invert(damp)
    for index in (0, 1):
        assert (
            _relative_error(low.blocks(index, dtype=torch.float64), dense.blocks(index, dtype=torch.float64))
            < 1e-4
        )
        assert _relative_error(low.diag(index).double(), dense.diag(index).double()) < 1e-4
        assert (
            _relative_error(low.diag_subblocks(index, 4).double(), dense.diag_subblocks(index, 4).double())
            < 1e-4
        )
    weights = torch.randn(3, block)
    prune = torch.rand(3, block) > 0.5
    rows = torch.arange(3)
    expected = obs_update_blocks(dense.blocks_at(0, rows, torch.float64), weights.double(), prune)
    got = low.obs_update(0, weights.double(), prune, rows)
    assert _relative_error(got, expected) < 1e-4
    assert torch.all((weights.double() + got)[prune].abs() < 1e-6)


def test_float32_cholesky_failures_fall_back_to_float64():
    """Rank-deficient Gram matrices (m < B) with a tiny damp break the float32 factorisation of some
    blocks (a zero pivot, which cholesky_inverse rejects); those blocks are redone in float64."""
    from obert_modifiers.algorithms.fisher import spd_inverse, spd_solve

    torch.manual_seed(5)
    block, m = 50, 24
    grads = torch.randn(64, m, block)
    matrices = grads.transpose(1, 2) @ grads / m + 1e-7 * torch.eye(block)
    info = torch.linalg.cholesky_ex(matrices / matrices.diagonal(dim1=1, dim2=2).sqrt().unsqueeze(2))[1]
    assert int((info != 0).sum()) > 0  # the case under test: some float32 factorisations fail
    inverse = spd_inverse(matrices)  # must not raise
    rhs = torch.randn(64, block)
    x = spd_solve(matrices, rhs)
    assert torch.isfinite(inverse).all() and torch.isfinite(x).all()
    # backward error (the systems have condition numbers ~1e9: compare residuals, not solutions)
    m64 = matrices.double()
    eye_residual = m64 @ inverse.double() - torch.eye(block, dtype=torch.float64)
    assert float(eye_residual.norm() / (m64.norm() * inverse.double().norm())) < 1e-6
    residual = (m64 @ x.double().unsqueeze(-1)).squeeze(-1) - rhs.double()
    assert float(residual.norm() / (m64.norm() * x.double().norm())) < 1e-6


def test_spilled_state_restores_without_a_second_allocation():
    from obert_modifiers.algorithms.fisher import make_fisher, restore_fisher

    torch.manual_seed(6)
    for m in (12, 2):  # dense blocks, low-rank form
        fisher = make_fisher([30, 17], 8, local_grads=m, total_grads=m, chunk_size=4)
        for _ in range(m):
            fisher.add_gradient([torch.randn(30), torch.randn(17)])
        fisher.invert(1e-3)
        state = fisher.spill_state()
        restored = restore_fisher([30, 17], 8, state, block_slice=3)
        assert type(restored) is type(fisher) and restored.inverted and restored.block_slice == 3
        for index in (0, 1):
            assert torch.equal(restored.diag(index), fisher.diag(index))
            torch.testing.assert_close(restored.blocks(index), fisher.blocks(index))
