"""Structured OBS (ZipLM): Hessian accumulation, saliency, weight and inverse updates, the greedy
database, all against the constrained least-squares problem solved directly (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from obert_modifiers.algorithms import structured_obs as sobs
from obert_modifiers.errors import ObertError

REL_DAMP = 0.01
RTOL = 1e-5


def _data(rows=6, cols=12, tokens=80, seed=0):
    """Correlated inputs X [tokens, cols] (so OBS compensation matters) and a weight [rows, cols]."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=gen, dtype=torch.float64) @ mix
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return x, w


def _hessian(x):
    h = sobs.InputHessian(x.shape[1], dtype=torch.float64)
    h.add(x)
    return h.hessian


class BruteForce:
    """min over W_hat with W_hat[:, removed] = 0 of (1/N) ||X_aug (W - W_hat)^T||^2, where X_aug stacks the
    calibration tokens and sqrt(lambda N / 2) I, so that the objective is exactly 1/2 tr(dW H_damped dW^T)."""

    def __init__(self, x, w, rel_damp=REL_DAMP):
        n, cols = x.shape
        h = 2.0 * x.T @ x / n
        lam = rel_damp * torch.diagonal(h).mean()
        self.x_aug = torch.cat([x, torch.sqrt(lam * n / 2.0) * torch.eye(cols, dtype=x.dtype)])
        self.n = n
        self.w = w
        self.h_damped = h + lam * torch.eye(cols, dtype=x.dtype)

    def solve(self, removed_cols):
        cols = self.w.shape[1]
        kept = [c for c in range(cols) if c not in set(int(c) for c in removed_cols)]
        target = self.x_aug @ self.w.T
        w_hat = torch.zeros_like(self.w)
        if kept:
            sol = torch.linalg.lstsq(self.x_aug[:, kept], target).solution  # [kept, rows]
            w_hat[:, kept] = sol.T
        residual = target - self.x_aug @ w_hat.T
        return w_hat, float((residual**2).sum() / self.n)


def _close(a, b, rtol=RTOL):
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def test_input_hessian_is_a_running_mean_and_drops_padding():
    x, _ = _data(tokens=50)
    h = sobs.InputHessian(x.shape[1], dtype=torch.float64)
    for chunk in (x[:7], x[7:30], x[30:]):  # uneven batches
        h.add(chunk.reshape(1, -1, x.shape[1]))  # [batch, seq, cols] like a hook sees
    assert h.count == 50
    torch.testing.assert_close(h.hessian, 2 * x.T @ x / 50, rtol=1e-12, atol=1e-12)

    masked = sobs.InputHessian(x.shape[1], dtype=torch.float64)
    padded = torch.cat([x[:10], torch.full((5, x.shape[1]), 99.0, dtype=torch.float64)])
    masked.add(padded, mask=torch.tensor([True] * 10 + [False] * 5))
    assert masked.count == 10
    torch.testing.assert_close(masked.hessian, 2 * x[:10].T @ x[:10] / 10)


def test_damped_hessian_fixes_dead_inputs_and_damps_by_mean_diagonal():
    h = torch.diag(torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64))
    damped = sobs.damped_hessian(h, 0.1)
    # dead input set to 1 first, then + 0.1 * mean(2, 1, 4)
    expected = torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64) + 0.7 / 3
    torch.testing.assert_close(torch.diagonal(damped), expected)
    assert h[1, 1] == 0  # input untouched


@pytest.mark.parametrize("group_size", [1, 3])
def test_saliency_update_and_inverse_equal_brute_force(group_size):
    x, w = _data()
    brute = BruteForce(x, w)
    h_damped = sobs.damped_hessian(_hessian(x), REL_DAMP)
    torch.testing.assert_close(h_damped, brute.h_damped)
    hinv = torch.linalg.inv(h_damped)
    scores = sobs.group_saliency(w, hinv, group_size)
    num_groups = w.shape[1] // group_size
    for g in range(num_groups):
        cols = sobs.group_columns([g], group_size)
        w_best, err = brute.solve(cols)
        assert _close(0.5 * float(scores[g]), err), (g, float(scores[g]) / 2, err)

        w_upd, hinv_upd = w.clone(), hinv.clone()
        eps = sobs.remove_columns(w_upd, hinv_upd, cols)
        assert _close(eps / 2, err)
        torch.testing.assert_close(w_upd, w_best, rtol=RTOL, atol=1e-8)
        assert torch.all(w_upd[:, cols] == 0)
        kept = [c for c in range(w.shape[1]) if c not in set(cols.tolist())]
        # the updated inverse is the inverse Hessian of the remaining columns
        torch.testing.assert_close(
            hinv_upd[kept][:, kept], torch.linalg.inv(h_damped[kept][:, kept]), rtol=RTOL, atol=1e-10
        )
        torch.testing.assert_close(hinv_upd[cols][:, cols], torch.eye(len(cols), dtype=torch.float64))


@pytest.mark.parametrize("group_size", [1, 3])
def test_greedy_database_equals_brute_force_at_every_level(group_size):
    x, w = _data(seed=1)
    brute = BruteForce(x, w)
    db = sobs.structured_obs(w, _hessian(x), group_size, rel_damp=REL_DAMP)
    num_groups = w.shape[1] // group_size
    assert db.levels == list(range(num_groups + 1))
    assert sorted(db.order) == list(range(num_groups))
    removed: list[int] = []
    for level in range(1, num_groups + 1):
        # greedy choice: the group whose removal (with the previous ones) costs least, by brute force
        base = brute.solve(sobs.group_columns(removed, group_size))[1] if removed else 0.0
        increments = {
            g: brute.solve(sobs.group_columns(removed + [g], group_size))[1] - base
            for g in range(num_groups)
            if g not in removed
        }
        best = min(increments, key=increments.get)
        assert db.order[level - 1] == best
        removed.append(best)
        w_best, err = brute.solve(sobs.group_columns(removed, group_size))
        assert _close(db.errors[level], err), (level, db.errors[level], err)
        torch.testing.assert_close(db.weight(level, full=True), w_best, rtol=RTOL, atol=1e-8)
        assert db.weight(level).shape == (w.shape[0], (num_groups - level) * group_size)
    assert _close(db.errors[num_groups], db.energy)  # everything removed: the whole output is lost
    assert db.relative_errors()[num_groups] == pytest.approx(1.0)
    assert db.by_kept()[num_groups] == 0.0 and db.by_kept()[0] == db.errors[num_groups]


@pytest.mark.parametrize("group_size, chunk", [(1, 4), (2, 1), (1, 1)])
def test_cumulative_error_is_the_reconstruction_error_of_the_final_weight(group_size, chunk):
    x, w = _data(rows=8, cols=24, tokens=200, seed=2)
    h = _hessian(x)
    levels = [0, 3, 5, 9, 12] if group_size == 2 else [0, 3, 5, 9, 17, 24]
    db = sobs.structured_obs(w, h, group_size, levels, rel_damp=REL_DAMP, chunk=chunk)
    assert db.levels == levels
    h_damped = sobs.damped_hessian(h, REL_DAMP)
    brute = BruteForce(x, w)
    for level in levels:
        err = sobs.reconstruction_error(w, db.weight(level, full=True), h_damped)
        assert _close(db.errors[level], err) or level == 0
        # whatever the chunking, the weights are the optimum for the set removed
        w_best, best_err = brute.solve(sobs.group_columns(db.order[:level], group_size).tolist())
        assert _close(db.errors[level], best_err) or level == 0
        torch.testing.assert_close(db.weight(level, full=True), w_best, rtol=RTOL, atol=1e-8)


@pytest.mark.parametrize("group_size", [1, 4])
def test_obs_update_beats_removal_without_update(group_size):
    x, w = _data(rows=8, cols=24, tokens=200, seed=3)
    h = _hessian(x)
    h_damped = sobs.damped_hessian(h, REL_DAMP)
    db = sobs.structured_obs(w, h, group_size)
    num_groups = 24 // group_size
    for level in range(1, num_groups):
        removed = sobs.group_columns(db.order[:level], group_size)
        zeroed = sobs.reconstruction_error(w, sobs.zero_columns(w, removed), h_damped)
        assert db.errors[level] < zeroed, (level, db.errors[level], zeroed)
    # on correlated inputs the compensation is worth a lot at half width
    half = num_groups // 2
    removed = sobs.group_columns(db.order[:half], group_size)
    assert db.errors[half] < 0.5 * sobs.reconstruction_error(w, sobs.zero_columns(w, removed), h_damped)


def test_dead_inputs_go_first_at_no_cost():
    x, w = _data(seed=4)
    x[:, 5] = 0.0
    db = sobs.structured_obs(w, _hessian(x), 1, levels=[1])
    assert db.order == [5]
    assert db.errors[1] == pytest.approx(0.0, abs=1e-12)
    assert torch.all(db.weight(0, full=True)[:, 5] == 0)  # the dead column carries nothing


def test_float32_default_agrees_with_float64():
    x, w = _data(rows=16, cols=32, tokens=400, seed=5)
    h32 = sobs.InputHessian(32)
    h32.add(x.float())
    db32 = sobs.structured_obs(w.float(), h32.hessian, 4)
    db64 = sobs.structured_obs(w, _hessian(x), 4)
    assert db32.order == db64.order
    for level in db64.levels[1:]:
        assert db32.errors[level] == pytest.approx(db64.errors[level], rel=1e-3)
    assert db32.weight(3).dtype == torch.float32


def test_input_hessians_hook_collects_linear_inputs_without_padding():
    lin = nn.Linear(6, 3).double()
    x, _ = _data(cols=6, tokens=40)
    batch = {}
    with sobs.input_hessians({"out": lin}, dtype=torch.float64, mask=lambda: batch["mask"]) as hessians:
        batch["mask"] = torch.ones(1, 25, dtype=torch.long)
        lin(x[:25].unsqueeze(0))
        batch["mask"] = torch.tensor([[1] * 15 + [0] * 5, [1] * 20])  # 5 padding tokens
        padded = torch.cat([x[25:40], torch.full((5, 6), 50.0, dtype=torch.float64), x[:20]])
        lin(padded.reshape(2, 20, 6))
        batch["mask"] = torch.ones(3)
        message = "the mask is \\(3,\\) but out's input is \\(4, 6\\)"
        with pytest.raises(sobs.StructuredOBSError, match=message):
            lin(x[:4])
    lin(x)  # hooks are gone
    assert hessians["out"].count == 60
    seen = torch.cat([x[:40], x[:20]])
    torch.testing.assert_close(hessians["out"].hessian, 2 * seen.T @ seen / 60)


@pytest.mark.parametrize("group_size, chunk", [(1, 3), (4, 1)])
def test_closed_form_weight_equals_the_greedy_databases(group_size, chunk):
    x, w = _data(rows=8, cols=24, tokens=200, seed=6)
    x[:, 7] = 0.0  # a dead input too
    h = _hessian(x)
    db = sobs.structured_obs(w, h, group_size, chunk=chunk)
    for level in db.levels[:-1]:
        got = sobs.optimal_weight(w, h, db.kept_columns(level))
        torch.testing.assert_close(got, db.weight(level), rtol=RTOL, atol=1e-8)


def test_bad_inputs_raise_named_errors():
    x, w = _data()
    h = _hessian(x)
    with pytest.raises(sobs.StructuredOBSError, match="group_size 5 must divide the 12"):
        sobs.structured_obs(w, h, 5)
    with pytest.raises(sobs.StructuredOBSError, match="levels \\[13\\] are outside 0..12"):
        sobs.structured_obs(w, h, 1, levels=[13])
    with pytest.raises(sobs.StructuredOBSError, match="hessian must be \\[12, 12\\]"):
        sobs.structured_obs(w, h[:5, :5], 1)
    with pytest.raises(ObertError, match="no inputs were added"):
        sobs.InputHessian(4).matrix()
    db = sobs.structured_obs(w, h, 1, levels=[2], store_weights=False)
    with pytest.raises(sobs.StructuredOBSError, match="level 3 is not in the database"):
        db.kept_groups(3)
    assert isinstance(sobs.StructuredOBSError("x"), ValueError)
