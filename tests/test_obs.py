"""OBS saliencies and weight updates against brute force; the pruning step end to end (pure torch)."""

from __future__ import annotations

import pytest
import torch

from obert_modifiers.algorithms.obs import (
    block_saliency,
    minimum_budget_bytes,
    obs_prune_step,
    obs_update_blocks,
    parse_mask_type,
    plan_memory,
    unstructured_saliency,
)
from obert_modifiers.algorithms.sparsity import PruningSchedule, interpolate, select_keep_masks


def _constrained_minimum(fisher: torch.Tensor, w: torch.Tensor, pruned: list) -> tuple:
    """Brute force: minimise 1/2 dw^T F dw subject to dw_q = -w_q for q in pruned (KKT system)."""
    n, k = w.numel(), len(pruned)
    kkt = torch.zeros(n + k, n + k, dtype=torch.float64)
    kkt[:n, :n] = fisher
    rhs = torch.zeros(n + k, dtype=torch.float64)
    for row, q in enumerate(pruned):
        kkt[n + row, q] = kkt[q, n + row] = 1.0
        rhs[n + row] = -w[q]
    dw = torch.linalg.solve(kkt, rhs)[:n]
    return dw, float(0.5 * dw @ fisher @ dw)


def _random_spd_inverse(n: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    fisher = a @ a.T / (3 * n) + 0.1 * torch.eye(n, dtype=torch.float64)
    return fisher, torch.linalg.inv(fisher)


def test_unstructured_saliency_is_the_optimal_loss_increase():
    fisher, finv = _random_spd_inverse(6, 0)
    w = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scores = unstructured_saliency(w.float(), finv.diagonal().float())
    for q in range(6):
        _, increase = _constrained_minimum(fisher, w, [q])
        assert scores[q].item() == pytest.approx(increase, rel=1e-4)


def test_block_saliency_is_the_optimal_loss_increase_of_the_group():
    fisher, finv = _random_spd_inverse(8, 2)
    w = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sub = torch.stack([finv[0:4, 0:4], finv[4:8, 4:8]])
    scores = block_saliency(w, sub)
    for group in range(2):
        _, increase = _constrained_minimum(fisher, w, list(range(4 * group, 4 * group + 4)))
        assert scores[group].item() == pytest.approx(increase, rel=1e-5)


def test_joint_update_equals_constrained_minimum():
    fisher, finv = _random_spd_inverse(10, 4)
    w = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    pruned = [1, 4, 5, 9]
    prune = torch.zeros(10, dtype=torch.bool)
    prune[pruned] = True
    dw = obs_update_blocks(finv[None], w[None], prune[None])[0]
    expected, _ = _constrained_minimum(fisher, w, pruned)
    torch.testing.assert_close(dw, expected, rtol=1e-8, atol=1e-10)
    assert torch.all((w + dw)[prune].abs() < 1e-10)


def _quadratic_toy(dim: int, num_grads: int, damp: float, seed: int):
    """Loss 1/2 (w - w*)^T H (w - w*) with H exactly the empirical Fisher of the given gradients."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=gen) / dim**0.5
    grads = torch.randn(num_grads, dim, generator=gen) @ mixing  # correlated coordinates
    hessian = grads.double().T @ grads.double() / num_grads + damp * torch.eye(dim, dtype=torch.float64)
    w_star = torch.randn(dim, generator=gen)
    return grads, hessian, w_star


def _gradient_feeder(weight: torch.nn.Parameter, grads: torch.Tensor):
    def sample(count: int):
        for i in range(count):
            weight.grad = grads[i % grads.shape[0]].clone()
            yield i

    return sample


def test_obs_update_lowers_the_loss_increase_on_a_quadratic():
    dim, damp = 16, 1e-3
    grads, hessian, w_star = _quadratic_toy(dim, 64, damp, seed=7)
    weight = torch.nn.Parameter(w_star.clone())
    keep = torch.ones(dim, dtype=torch.bool)
    stats = obs_prune_step(
        [weight],
        [keep],
        [0.5],
        _gradient_feeder(weight, grads),
        num_grads=64,
        damp=damp,
        fisher_block_size=dim,
    )
    assert stats.achieved == pytest.approx(0.5)
    assert int((weight.detach() == 0).sum()) == 8
    loss = lambda w: float(0.5 * (w.double() - w_star.double()) @ hessian @ (w.double() - w_star.double()))  # noqa: E731
    with_update = loss(weight.detach())
    without_update = loss(w_star * keep)
    magnitude_keep = w_star.abs() >= w_star.abs().kthvalue(8).values
    magnitude = loss(w_star * magnitude_keep)
    assert with_update < 0.8 * without_update
    assert with_update < magnitude
    # and it is the optimum for that mask: matches the brute-force constrained minimum
    _, optimum = _constrained_minimum(hessian, w_star.double(), torch.nonzero(~keep).flatten().tolist())
    assert with_update == pytest.approx(optimum, rel=1e-3)


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    )
    data = torch.randn(40, 8), torch.randint(0, 3, (40,))
    return model, data


def _model_sampler(model, data):
    def sample(count: int):
        x, y = data
        for i in range(count):
            model.zero_grad()
            index = slice((i * 4) % 40, (i * 4) % 40 + 4)
            torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            yield i

    return sample


@pytest.mark.parametrize(
    "mask_type,global_sparsity", [("unstructured", True), ("block4", False), ("block4", True)]
)
def test_prune_step_reaches_targets_and_keeps_pruned(mask_type, global_sparsity):
    model, data = _tiny_model()
    params = [model[0].weight, model[2].weight]
    masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
    for target in (0.3, 0.6):
        before = [m.clone() for m in masks]
        stats = obs_prune_step(
            params,
            masks,
            [target, target],
            _model_sampler(model, data),
            num_grads=12,
            damp=1e-4,
            fisher_block_size=8,
            mask_type=mask_type,
            global_sparsity=global_sparsity,
            other_params=[p for p in model.parameters() if all(p is not q for q in params)],
        )
        assert stats.achieved == pytest.approx(target, abs=0.02)  # block4: 32 groups per weight
        for p, m, b in zip(params, masks, before, strict=False):
            assert torch.all(p[~m] == 0)
            assert not torch.any(m & ~b)  # nothing pruned comes back
            if not global_sparsity:
                assert 1 - m.float().mean().item() == pytest.approx(target, abs=0.03)
            if mask_type == "block4":  # whole runs of 4 consecutive weights
                groups = m.reshape(-1, 4)
                assert torch.all(groups.all(1) | ~groups.any(1))
        assert stats.grad_seconds >= 0 and stats.inverse_seconds > 0 and stats.num_grads == 12


def _budgeted_step(num_grads: int, budget_gb, global_sparsity: bool = True, mask_type: str = "unstructured"):
    model, data = _tiny_model(3)
    params = [model[0].weight, model[2].weight, model[4].weight]
    masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
    stats = obs_prune_step(
        params,
        masks,
        [0.5] * 3,
        _model_sampler(model, data),
        num_grads=num_grads,
        damp=1e-4,
        fisher_block_size=8,
        mask_type=mask_type,
        global_sparsity=global_sparsity,
        memory_budget_gb=budget_gb,
        num_recomputations=2,
        other_params=[p for p in model.parameters() if all(p is not q for q in params)],
    )
    assert all(p.requires_grad for p in model.parameters())  # restored after grouped passes
    return stats, [p.detach().clone() for p in params], masks


@pytest.mark.parametrize(
    "num_grads,global_sparsity,mask_type",
    [(8, True, "unstructured"), (2, True, "unstructured"), (8, False, "unstructured"), (8, True, "block4")],
)  # dense blocks, low-rank (m <= B/4) form, layer-wise threshold, block masks
def test_memory_budget_gives_the_same_result_in_groups(num_grads, global_sparsity, mask_type):
    base_stats, base_weights, base_masks = _budgeted_step(num_grads, None, global_sparsity, mask_type)
    numels = [8 * 16, 16 * 8, 8 * 3]
    group = 4 if mask_type == "block4" else 1
    floor = minimum_budget_bytes(numels, block_size=8, num_grads=num_grads, mask_group=group)
    # just above the floor: parameters are split at block boundaries into many groups
    for budget in (floor, int(1.1 * floor)):
        stats, weights, masks = _budgeted_step(num_grads, budget / 2**30, global_sparsity, mask_type)
        plan = plan_memory(numels, block_size=8, num_grads=num_grads, budget_bytes=budget, mask_group=group)
        assert base_stats.num_groups == 1 and stats.num_groups == len(plan.groups) >= 2
        assert sum(len(g) for g in plan.groups) > len(numels)  # some parameter is split across groups
        assert stats.estimate_bytes <= budget
        for a, b in zip(base_weights, weights, strict=False):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        for a, b in zip(base_masks, masks, strict=False):
            assert torch.equal(a, b)


def test_planner_estimate_stays_below_the_budget_and_splits_parameters():
    numels = [768 * 768] * 4 + [768 * 3072] * 2  # one BERT-base encoder layer
    unbudgeted = plan_memory(numels, block_size=50, num_grads=256)
    assert len(unbudgeted.groups) == 1 and unbudgeted.budget_bytes is None
    for share in (0.5, 0.25, 0.15):
        budget = int(share * unbudgeted.estimate_bytes)
        plan = plan_memory(numels, block_size=50, num_grads=256, budget_bytes=budget)
        assert plan.estimate_bytes <= 0.9 * budget  # 10 % headroom for activations and slack
        segments = [s for g in plan.groups for s in g]
        # every weight exactly once, in parameter order, cut at Fisher-block boundaries
        assert [(s.param, s.start) for s in segments] == sorted((s.param, s.start) for s in segments)
        for index, numel in enumerate(numels):
            mine = [s for s in segments if s.param == index]
            assert mine[0].start == 0 and mine[-1].stop == numel
            assert all(a.stop == b.start and b.start % 50 == 0 for a, b in zip(mine, mine[1:], strict=False))
        assert len(plan.groups) >= round(1 / share) - 1


def test_budget_too_small_names_the_key_and_the_smallest_budget():
    floor = minimum_budget_bytes([1000, 10], block_size=50, num_grads=16)
    with pytest.raises(ValueError, match=r"memory_budget_gb=.*smallest feasible budget is") as error:
        plan_memory([1000, 10], block_size=50, num_grads=16, budget_bytes=floor - 1)
    assert f"{floor / 2**30:.4g}" in str(error.value)
    assert plan_memory([1000, 10], block_size=50, num_grads=16, budget_bytes=floor).budget_bytes == floor


def test_mask_type_parsing():
    assert (
        parse_mask_type("unstructured") == 1
        and parse_mask_type("block4") == 4
        and parse_mask_type("block16") == 16
    )
    for bad in ("block", "block1", "4block", "nm"):
        with pytest.raises(ValueError, match="mask_type"):
            parse_mask_type(bad)


def test_schedule_matches_sparseml_interpolation_rules():
    assert interpolate(0.0, 0, 10, 0.3, 0.9, "cubic") == 0.3
    assert interpolate(10.0, 0, 10, 0.3, 0.9, "cubic") == 0.9
    assert interpolate(5.0, 0, 10, 0.3, 0.9, "cubic") == pytest.approx(0.3 + 0.6 * (1 - 0.5**3))
    assert interpolate(5.0, 0, 10, 0.0, 1.0, "inverse_cubic") == pytest.approx(1 - 0.5 ** (1 / 3))
    schedule = PruningSchedule(0.3, 0.9, 1.0, 3.0, 1.0)
    done, last, ended = schedule.replay(steps=40, steps_per_epoch=10)
    assert (done, last, ended) == (3, 3.0, True)  # epochs 1, 2, 3
    assert schedule.replay(steps=15, steps_per_epoch=10)[:2] == (1, 1.0)


def test_global_and_layerwise_top_k():
    scores = [torch.tensor([1.0, 5.0, 3.0, 7.0]), torch.tensor([2.0, 0.5])]
    keep = select_keep_masks(scores, [0.5, 0.5], True)
    assert keep[0].tolist() == [False, True, True, True] and keep[1].tolist() == [False, False]
    keep = select_keep_masks(scores, [0.5, 0.5], False)
    assert keep[0].tolist() == [False, True, False, True] and keep[1].tolist() == [True, False]
