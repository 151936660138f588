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
