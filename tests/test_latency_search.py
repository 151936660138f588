"""Latency tables (keys, JSON round trip, prediction) and the budgeted search, against exhaustive
enumeration on small cases."""

from __future__ import annotations

import itertools
import random

import pytest

from obert_modifiers.algorithms import latency_search as ls
from obert_modifiers.errors import ObertError


def _key(**over):
    base = dict(
        runtime="onnxruntime",
        threads=2,
        batch_size=1,
        sequence_length=128,
        precision="fp32",
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        num_hidden_layers=4,
    )
    base.update(over)
    return ls.LatencyKey(**base)


def _table():
    return ls.LatencyTable(
        key=_key(),
        base=1.0,
        attention={0: 0.05, 1: 0.4, 2: 0.7, 3: 1.0, 4: 1.3},
        ffn={0: 0.05, 32: 1.0, 64: 2.0},
        meta={"rounds": 3},
    )


def _brute(errors, times, budget):
    best = None
    for combo in itertools.product(*[sorted(e) for e in errors]):
        t = 0.0
        err = 0.0
        for module, option in enumerate(combo):  # same summation order as the DP
            t += times[module][option]
            err += errors[module][option]
        if t <= budget and (best is None or err < best[0] or (err == best[0] and t < best[1])):
            best = (err, t, list(combo))
    return best


def _random_case(rng, modules, options):
    errors, times = [], []
    for _ in range(modules):
        keys = sorted(rng.sample(range(20), options))
        # more kept -> more time, less error (as real databases), with noise
        t = {k: round(0.1 + k * rng.uniform(0.5, 1.5) + rng.random(), 3) for k in keys}
        e = {k: max(0.0, (20 - k) * rng.uniform(0.2, 2.0) + rng.random()) for k in keys}
        errors.append(e)
        times.append(t)
    return errors, times


@pytest.mark.parametrize("seed", range(8))
def test_dp_equals_exhaustive_search_and_respects_the_budget(seed):
    rng = random.Random(seed)
    errors, times = _random_case(rng, modules=4, options=4)
    lo = sum(min(t.values()) for t in times)
    hi = sum(max(t.values()) for t in times)
    for frac in (0.0, 0.1, 0.35, 0.6, 0.9, 1.0):
        budget = lo + frac * (hi - lo)
        got = ls.dp_allocate(errors, times, budget)
        want = _brute(errors, times, budget)
        assert got.time <= budget
        assert got.error == pytest.approx(want[0], rel=1e-12, abs=1e-12), (budget, got, want)
        recomputed = sum(times[m][c] for m, c in enumerate(got.choices))
        assert recomputed == pytest.approx(got.time, rel=1e-12)


def test_dp_meets_the_budget_exactly_where_the_optimum_does():
    # integer times; error falls strictly with time, so the optimum spends the whole budget
    times = [{0: 1.0, 1: 2.0, 2: 4.0, 3: 7.0}] * 3 + [{0: 1.0, 2: 3.0, 4: 5.0}]
    errors = [{0: 9.0, 1: 5.0, 2: 2.0, 3: 0.0}] * 3 + [{0: 6.0, 2: 2.5, 4: 0.0}]
    hits = 0
    for budget in range(4, 27):
        got = ls.dp_allocate(errors, times, float(budget))
        want = _brute(errors, times, float(budget))
        assert got.error == pytest.approx(want[0])
        assert got.time <= budget
        if want[1] == budget:
            hits += 1
            assert got.time == budget, (budget, got)
    assert hits >= 10  # the test exercises the exact-hit case many times


def test_thinned_front_never_exceeds_the_budget():
    rng = random.Random(11)
    errors, times = _random_case(rng, modules=8, options=6)
    lo = sum(min(t.values()) for t in times)
    hi = sum(max(t.values()) for t in times)
    for frac in (0.05, 0.3, 0.5, 0.8):
        budget = lo + frac * (hi - lo)
        exact = ls.dp_allocate(errors, times, budget)
        thinned = ls.dp_allocate(errors, times, budget, max_states=4)
        assert thinned.time <= budget and exact.time <= budget
        assert thinned.error >= exact.error - 1e-9  # thinning can only lose optimality


def test_infeasible_budget_names_the_smallest_reachable_latency():
    times = [{0: 1.5, 1: 3.0}, {0: 2.0, 2: 4.0}]
    errors = [{0: 1.0, 1: 0.0}, {0: 1.0, 2: 0.0}]
    with pytest.raises(ls.LatencySearchError, match="smallest reachable latency is 3.5") as info:
        ls.dp_allocate(errors, times, 3.4)
    assert isinstance(info.value, ObertError) and isinstance(info.value, ValueError)
    assert ls.dp_allocate(errors, times, 3.5).choices == [0, 0]
    with pytest.raises(ls.LatencySearchError, match="module 1 has no time for options \\[2\\]"):
        ls.dp_allocate(errors, [times[0], {0: 2.0}], 10.0)


def test_table_json_round_trip_and_prediction():
    table = _table()
    again = ls.LatencyTable.from_json(table.to_json())
    assert again == table
    assert again.key.to_dict()["sequence_length"] == 128
    assert table.ffn_time(48) == pytest.approx(1.5)  # linear between grid points 32 and 64
    assert table.dense() == pytest.approx(1.0 + 4 * (1.3 + 2.0))
    # base + (4 heads, 64) + (0 heads, 32) + (2 heads, 0) + (1 head, 16: halfway between 0.05 and 1.0)
    expected = 1.0 + (1.3 + 2.0) + (0.05 + 1.0) + (0.7 + 0.05) + (0.4 + 0.525)
    assert table.predict([4, 0, 2, 1], [64, 32, 0, 16]) == pytest.approx(expected)
    assert table.budget(2.0) == pytest.approx(table.dense() / 2 - 1.0)
    assert _key().digest() == _key().digest() != _key(threads=1).digest()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="other/1"), "format is 'other/1'"),
        (lambda d: d["key"].pop("precision"), "missing fields \\['precision'\\]"),
        (lambda d: d["key"].update(precision="int4"), "precision must be one of"),
        (lambda d: d["attention"].pop("2"), "every kept-head count 0..4"),
        (lambda d: d["ffn"].pop("64"), "ffn grid must run from 0 to intermediate_size 64"),
        (lambda d: d["ffn"].update({"32": -1}), "negative or non-finite"),
    ],
)
def test_bad_tables_are_refused_with_the_reason(mutate, message):
    import json

    data = json.loads(_table().to_json())
    mutate(data)
    with pytest.raises(ls.LatencySearchError, match=f"table.json: .*{message}"):
        ls.LatencyTable.from_json(json.dumps(data), source="table.json")


def test_search_structure_reaches_the_target_with_the_least_error():
    table = _table()
    heads = list(range(5))
    ffn = [0, 16, 32, 48, 64]
    # layer 0 and 3 are sensitive, 1 and 2 are not
    scale = [10.0, 1.0, 1.0, 10.0]
    attention_errors = [{k: s * (4 - k) ** 2 for k in heads} for s in scale]
    ffn_errors = [{n: s * ((64 - n) / 16) ** 2 for n in ffn} for s in scale]
    choice = ls.search_structure(table, attention_errors, ffn_errors, 2.0)
    assert choice.speedup >= 2.0 - 1e-9
    assert choice.predicted == pytest.approx(table.predict(choice.heads, choice.ffn))
    # the insensitive layers are pruned harder
    assert choice.heads[1] <= choice.heads[0] and choice.ffn[2] <= choice.ffn[3]
    # equal to exhaustive search over the same options
    errors = [*attention_errors, *ffn_errors]
    times = [{k: table.attention_time(k) for k in heads}] * 4 + [{n: table.ffn_time(n) for n in ffn}] * 4
    want = _brute(errors, times, table.budget(2.0))
    assert choice.error == pytest.approx(want[0])

    message = "speed-up 20 is out of reach: the smallest reachable latency is 1.4 ms .*at most 10.1x"
    with pytest.raises(ls.LatencySearchError, match=message):
        ls.search_structure(table, attention_errors, ffn_errors, 20.0)


# ------------------------------------------------------------------------------ uniform width (ablation)
def _brute_uniform(table, attention_errors, ffn_errors, speedup):
    layers = len(attention_errors)
    budget = table.budget(speedup, layers)
    best = None
    for h in set.intersection(*(set(e) for e in attention_errors)):
        for n in set.intersection(*(set(e) for e in ffn_errors)):
            t = table.predict([h] * layers, [n] * layers)
            err = sum(e[h] for e in attention_errors) + sum(e[n] for e in ffn_errors)
            if t <= budget and (best is None or (err, t) < best[:2]):
                best = (err, t, h, n)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_uniform_search_equals_enumeration_keeps_one_width_and_never_exceeds_the_budget(seed):
    rng = random.Random(seed)
    table = _table()
    layers = table.key.num_hidden_layers
    attention = [{k: (4 - k) * rng.uniform(0.5, 2.0) for k in range(5)} for _ in range(layers)]
    ffn = [{n: (64 - n) * rng.uniform(0.1, 1.0) for n in (0, 32, 64)} for _ in range(layers)]
    speedup = rng.uniform(1.1, 2.5)
    expected = _brute_uniform(table, attention, ffn, speedup)
    if expected is None:
        with pytest.raises(ls.LatencySearchError, match="same width in every layer"):
            ls.search_uniform(table, attention, ffn, speedup)
        return
    choice = ls.search_uniform(table, attention, ffn, speedup)
    assert len(set(choice.heads)) == 1 and len(set(choice.ffn)) == 1
    assert (choice.heads[0], choice.ffn[0]) == expected[2:]
    assert choice.error == pytest.approx(expected[0])
    assert choice.predicted <= table.budget(speedup, layers) + 1e-12
    # the per-layer search is never worse at the same budget: it may pick the uniform answer
    assert ls.search_structure(table, attention, ffn, speedup).error <= choice.error + 1e-9


def test_uniform_search_refuses_mismatched_databases_and_names_the_reachable_minimum():
    table = _table()
    with pytest.raises(ls.LatencySearchError, match="2 attention databases but 1 FFN"):
        ls.search_uniform(table, [{4: 0.0}, {4: 0.0}], [{64: 0.0}], 1.5)
    layers = table.key.num_hidden_layers
    with pytest.raises(ls.LatencySearchError, match="smallest uniform latency"):
        ls.search_uniform(table, [{4: 0.0, 3: 1.0}] * layers, [{64: 0.0}] * layers, 3.0)


# --- the additive fit behind measured tables ------------------------------------------------------------

LAYERS, HEADS, WIDTH = 6, 12, 1536


def _timed(time_of, noise: float = 0.0, seed: int = 0):
    """The graphs a measured table times (uniform shrinks), each with ``time_of``'s time times noise."""
    rng = random.Random(seed)
    shapes = [([HEADS] * LAYERS, [WIDTH] * LAYERS), ([0] * LAYERS, [0] * LAYERS)]
    shapes += [([k] * LAYERS, [WIDTH] * LAYERS) for k in range(HEADS)]
    shapes += [([HEADS] * LAYERS, [n] * LAYERS) for n in range(0, WIDTH, 128)]
    return [(h, f, time_of(h, f) * (1 + rng.gauss(0, noise))) for h, f in shapes]


def _affine(h, f):
    return 0.9 + sum(0.3 + 0.15 * k for k in h if k) + sum(0.2 + 0.0012 * n for n in f if n)


def _kkt(models, fit):
    """The non-negative least-squares optimality conditions of the relative-error problem: the gradient
    is 0 along every positive coefficient and points into the constraint along every zero one."""
    import torch

    rows = torch.tensor(
        [[1.0, sum(k > 0 for k in h), sum(h), sum(n > 0 for n in f), sum(f)] for h, f, _ in models],
        dtype=torch.float64,
    )
    times = torch.tensor([t for *_, t in models], dtype=torch.float64)
    coef = torch.tensor(
        [fit.base, fit.attention.intercept, fit.attention.slope, fit.ffn.intercept, fit.ffn.slope],
        dtype=torch.float64,
    )
    weighted = rows / times.unsqueeze(1)
    gradient = weighted.T @ (weighted @ coef - 1)
    scale = weighted.abs().amax(dim=0)  # the gradient per unit of each (differently sized) column
    for value, slope, size in zip(coef.tolist(), gradient.tolist(), scale.tolist(), strict=True):
        if value > 1e-12:
            assert abs(slope) / size < 1e-6, (value, slope)
        else:
            assert slope / size > -1e-6, (value, slope)


def test_additive_fit_recovers_an_affine_runtime_exactly():
    fit = ls.fit_additive(_timed(_affine))
    assert fit.base == pytest.approx(0.9)
    assert (fit.attention.intercept, fit.attention.slope) == pytest.approx((0.3, 0.15))
    assert (fit.ffn.intercept, fit.ffn.slope) == pytest.approx((0.2, 0.0012))
    assert fit.rms < 1e-9 and fit.attention(0) == fit.ffn(0) == 0.0
    heads, ffn = [3, 12, 0, 7, 1, 5], [0, 384, 1536, 100, 900, 64]
    assert fit.predict(heads, ffn) == pytest.approx(_affine(heads, ffn))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_timings_give_the_non_negative_optimum_and_no_plateaus(seed):
    """10 % noise per timing (as measured on 2 vCPUs): the fit is the exact non-negative least-squares
    optimum, and every wider block costs strictly more (no range of widths at one price for a search to
    exploit)."""
    models = _timed(_affine, noise=0.10, seed=seed)
    fit = ls.fit_additive(models)
    _kkt(models, fit)
    heads = [fit.attention(k) for k in range(HEADS + 1)]
    widths = [fit.ffn(n) for n in range(0, WIDTH + 1, 128)]
    for entries in (heads, widths):
        assert all(a < b for a, b in itertools.pairwise(entries)), entries


def _fitted_table(models):
    fit = ls.fit_additive(models)
    key = _key(hidden_size=384, num_attention_heads=HEADS, intermediate_size=WIDTH, num_hidden_layers=LAYERS)
    attention = {k: fit.attention(k) for k in range(HEADS + 1)}
    return ls.LatencyTable(key, fit.base, attention, {n: fit.ffn(n) for n in range(0, WIDTH + 1, 128)})


def test_structures_searched_on_a_noisy_fitted_table_run_as_fast_as_predicted():
    """What the table is for: the search's choice must come true. Over many noisy measurements (10 % per
    timing) and random error databases, the chosen 3x structure's true speed-up (by the runtime the
    timings came from) is on average within 6 % of the table's prediction; a search seeks out
    underpriced widths, so a table whose errors it can exploit falls short by more (the former running
    maximum: 18 % in the same simulation, ``benchmarks/latency_fit.py``)."""
    shortfalls = []
    for seed in range(30):
        rng = random.Random(seed)
        attention_errors = [{k: (1 - k / HEADS) ** 2 * rng.uniform(0.5, 2) for k in range(HEADS + 1)}]
        ffn_errors = [{n: (1 - n / WIDTH) ** 2 * rng.uniform(0.5, 2) for n in range(0, WIDTH + 1, 32)}]
        choice = ls.search_structure(
            _fitted_table(_timed(_affine, noise=0.10, seed=seed)),
            attention_errors * LAYERS,
            ffn_errors * LAYERS,
            3.0,
        )
        true = _affine([HEADS] * LAYERS, [WIDTH] * LAYERS) / _affine(choice.heads, choice.ffn)
        shortfalls.append(true / choice.speedup - 1)
    assert abs(sum(shortfalls) / len(shortfalls)) < 0.06, shortfalls


def test_a_falling_trend_in_noise_fits_a_flat_block_never_a_falling_one():
    """Where timings fall as a block widens (noise only), the slope is held at 0 (the non-negative
    optimum), not fitted negative."""
    models = _timed(lambda h, f: _affine(h, f) - 0.0014 * sum(f))  # neurons cost -0.0002 ms each
    fit = ls.fit_additive(models)
    _kkt(models, fit)
    assert fit.ffn.slope == 0.0 and fit.attention.slope > 0


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([([1], [1], 1.0)] * 4, "at least 5 timed models"),
        ([([1, 2], [1], 1.0)] * 5, "as many head counts as FFN widths"),
        ([([1], [1], float("nan"))] * 5, "finite positive time"),
        ([([1], [1], 0.0)] * 5, "finite positive time"),
    ],
)
def test_bad_timings_are_refused_by_the_fit(models, message):
    with pytest.raises(ls.LatencySearchError, match=message):
        ls.fit_additive(models)
