"""The statistics and bookkeeping that the benchmark scripts' published figures rest on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _pipeline as pipeline  # noqa: E402
from benchmarks._results import paired_comparison  # noqa: E402
from benchmarks._rows import ROWS, SETTINGS, command_text, epochs_text, slice_text, stages_for  # noqa: E402


def test_paired_comparison_is_mcnemars_exact_test():
    # 8 snippets only B gets right, 2 only A: two-sided binomial p = 2 * P(X <= 2 | 10, 1/2)
    a = [True] * 50 + [False] * 8 + [True] * 2 + [False] * 40
    b = [True] * 50 + [True] * 8 + [False] * 2 + [False] * 40
    result = paired_comparison(a, b)
    assert (result["a_only"], result["b_only"], result["n"]) == (2, 8, 100)
    assert result["p_value"] == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert paired_comparison(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError, match="same examples"):
        paired_comparison(a, b[:-1])


def test_interleaved_rounds_report_the_median_round():
    def run(ms: float, status: str = "ok") -> dict:
        return {"median_ms": ms, "p90_ms": ms * 1.1, "status": status, "model": "m"}

    entry = pipeline._median_of_rounds([run(5.0), run(3.0), run(9.0)])
    assert entry["median_ms"] == 5.0 and entry["p90_ms"] == pytest.approx(5.5)
    assert entry["round_medians_ms"] == [5.0, 3.0, 9.0] and entry["rounds"] == 3
    entry = pipeline._median_of_rounds([run(4.0), run(2.0, "failed"), run(6.0)])
    assert entry["median_ms"] == 5.0 and entry["round_medians_ms"] == [4.0, 6.0]
    assert pipeline._median_of_rounds([run(1.0, "failed")])["status"] == "failed"


def test_a_row_schedule_changes_only_that_rows_stage():
    cfg = dict(SETTINGS["full"])
    base = {s.name: s for s in stages_for(ROWS, {**cfg, "row_schedule": {}})}
    longer = {"6L-80-block4-INT8": {"qat_epochs": 3.0}}
    own = {s.name: s for s in stages_for(ROWS, {**cfg, "row_schedule": longer})}
    assert own["6L-80-block4-INT8"].recipe_args["qat_epochs"] == 3.0
    assert own["6L-80-block4-INT8"].recipe_args != base["6L-80-block4-INT8"].recipe_args
    for name in base:
        if name != "6L-80-block4-INT8":
            assert own[name].recipe_args == base[name].recipe_args
    three = next(r for r in ROWS if r.layers == 3)
    assert epochs_text(cfg, three).startswith(f"drop {cfg['drop_epochs']:g} + prune")
    assert "QAT" not in epochs_text(cfg, next(r for r in ROWS if r.name == "6L-80-unstructured"))


def test_pareto_front_drops_dominated_rows():
    from benchmarks.reproduce import pareto

    assert pareto([(1.0, 0.82), (5.0, 0.80), (4.0, 0.79), (6.6, 0.80)]) == [True, False, False, True]


def test_baseline_check_flags_disagreeing_dense_baselines():
    """ORT computes every 6-layer FP32 row densely: when their latencies disagree the check reports
    the spread and the speed-ups against the fastest; when they agree it stays silent."""
    from benchmarks.reproduce import baseline_check

    def row(name, layers, int8, ort, ds):
        return {"row": name, "layers": layers, "int8": int8, "onnxruntime_b1_s128_ms": ort,
                "deepsparse_b1_s128_ms": ds}  # fmt: skip

    table = [
        row("dense", 6, False, 24.0, 16.0),
        row("6L-80-unstructured", 6, False, 16.0, 7.0),
        row("6L-80-block4-INT8", 6, True, 13.0, 3.2),
        row("3L-80-block4-INT8", 3, True, 6.8, 1.6),
    ]
    check = baseline_check(table)
    assert check["ort_fp32_6layer_ms"] == {"dense": 24.0, "6L-80-unstructured": 16.0}
    assert check["speedups_vs_fastest"]["6L-80-block4-INT8"] == pytest.approx(5.0)
    assert check["speedups_vs_fastest"]["3L-80-block4-INT8"] == pytest.approx(10.0)
    assert "6L-80-block4-INT8 5.00x" in check["text"] and "dense 24.00 ms" in check["text"]
    table[0]["onnxruntime_b1_s128_ms"] = 17.0
    assert baseline_check(table) is None


def test_paired_round_ratios_pair_each_round():
    from benchmarks._pipeline import paired_round_ratios

    def entry(model, engine, rounds, status="ok"):
        return {"model": model, "engine": engine, "batch_size": 1, "sequence_length": 128, "num_cores": 2,
                "status": status, "round_medians_ms": rounds}  # fmt: skip

    rows = [entry("dense", "onnxruntime", [24.0, 40.0, 16.0]), entry("int8", "deepsparse", [4.0, 3.2, 3.2])]
    keys = ("dense", "onnxruntime", 1, 128, 2), ("int8", "deepsparse", 1, 128, 2)
    assert paired_round_ratios(rows, *keys) == pytest.approx([6.0, 12.5, 5.0])
    rows[1]["round_medians_ms"] = [4.0, 3.2]  # a failed round: rounds no longer line up
    assert paired_round_ratios(rows, *keys) == []


def test_recovery_schedule_splits_reuse_the_tables_stage_and_check_their_epochs():
    """The study's split equal to the table's is the table's own stage (same name and cache key);
    the others differ only in their epochs; malformed or fractional-total splits are refused."""
    from benchmarks.recovery_schedules import ROW, parse_schedules, split_stages

    cfg = dict(SETTINGS["full"])
    table = {s.name: s for s in stages_for(ROWS, cfg)}[ROW.name]
    mine = {**cfg, **cfg["row_schedule"][ROW.name]}
    qat = mine["qat_epochs"]
    splits = parse_schedules(f"{mine['prune_epochs']:g}:{mine['recovery_epochs']:g},3:2", qat)
    stages = split_stages(cfg, splits)
    assert [s.name for s in stages] == ["dense", ROW.name, f"{ROW.name}@prune3-recover2"]
    training = {"seq": 64}
    keys = {"dense": stages[0].key({}, training)}
    assert stages[1].key(keys, training) == table.key(keys, training)
    other = stages[2].recipe_args
    assert (other["prune_epochs"], other["recovery_epochs"]) == (3.0, 2.0)
    assert {k: v for k, v in other.items() if "epochs" not in k or k == "qat_epochs"} == {
        k: v for k, v in table.recipe_args.items() if "epochs" not in k or k == "qat_epochs"
    }
    with pytest.raises(ValueError, match="PRUNE:RECOVERY"):
        parse_schedules("1.5-2.5", qat)
    with pytest.raises(ValueError, match="whole"):
        parse_schedules("1.5:2", qat)
    with pytest.raises(ValueError, match="prune epochs must be > 0"):
        parse_schedules("0:3", qat)


def test_reports_name_the_training_data_and_the_flag_that_reruns_it():
    """A table measured on a slice other than its mode's default says so in its rerun command."""
    full, quick = dict(SETTINGS["full"]), dict(SETTINGS["quick"])
    assert command_text("reproduce.py", "full", full) == "python benchmarks/reproduce.py"
    assert command_text("reproduce.py", "quick", quick) == "python benchmarks/reproduce.py --quick"
    other = 4000 if full["max_train"] is None else None
    assert command_text("compound.py", "full", {**full, "max_train": other}) == (
        f"python benchmarks/compound.py --max-train {other or 0}"
    )
    assert slice_text({"max_train": 4000}) == "4,000 training snippets"
    assert slice_text({"max_train": None}) == "all 9,755 training snippets"


def test_no_benchmark_script_imports_another_script():
    """Scripts are leaves: what two of them share lives in a ``_helper`` module or in the package."""
    import ast

    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")}
    assert {"reproduce", "compound", "recovery_schedules"} <= scripts
    found = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                package, _, module = name.partition(".")
                if package == "benchmarks" and module.split(".")[0] in scripts:
                    found.append((path.name, name))
    assert found == []


def test_stage_commands_come_from_the_packages_builder():
    """A stage runs the package's one stock command (``runs.stock.train_command``) with the stage's
    recipe, arguments and teacher; the benchmarks keep no offline dict or scorer of their own."""
    from obert_modifiers.runs.stock import stock_script

    stage = pipeline.Stage("s", "minilm_6l_prune.yaml", {"final_sparsity": 0.8}, parent="d", teacher="d")
    training = {"seq": 64, "batch_size": 16, "seed": 7}
    command = pipeline._command(stage, Path("start"), None, Path("data"), Path("out"), training)
    assert command[: len(stock_script())] == stock_script()

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert value("--recipe") == str(pipeline.RECIPES / "minilm_6l_prune.yaml")
    assert value("--recipe_args") == '{"final_sparsity": 0.8}'
    assert value("--distill_teacher") == "disable"  # no teacher folder given
    assert (value("--seed"), value("--max_seq_length"), value("--save_safetensors")) == ("7", "64", "False")
    teacher = pipeline._command(stage, Path("start"), Path("t"), Path("data"), Path("out"), training)
    assert teacher[teacher.index("--distill_teacher") + 1] == "t"
    assert not hasattr(pipeline, "OFFLINE") and not hasattr(pipeline, "test_accuracy")


def test_run_stages_trains_parents_first_reuses_finished_ones_names_a_failure(tmp_path, monkeypatch, capsys):
    """The scheduler on stand-in commands (each writes its output folder and prints a trainer-like
    counter): a child starts from a clean copy of its parent, a rerun reuses both, a failing stage
    raises naming its log."""
    import json

    from obert_modifiers.runs.stock import StockRunError

    code = (
        "import sys, pathlib; out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True); "
        "(out / 'start.txt').write_text(sys.argv[2]); print(' 50%|#   | 1/2 [00:01]', flush=True); "
        "sys.exit(3 if out.name == 'broken' else 0)"
    )

    def command(stage, start, teacher, data, out, training):
        return [sys.executable, "-c", code, str(out), str(start)]

    monkeypatch.setattr(pipeline, "_command", command)
    stages = [
        pipeline.Stage("dense", "minilm_teacher.yaml"),
        pipeline.Stage("child", "minilm_6l_prune.yaml", {"num_grads": 8}, parent="dense", teacher="dense"),
    ]
    done = pipeline.run_stages(stages, tmp_path, tmp_path / "data", {"seq": 64}, jobs=2)
    assert done == {"dense": tmp_path / "dense", "child": tmp_path / "child"}
    assert (tmp_path / "child" / "start.txt").read_text() == str(tmp_path / ".child-start")
    assert not (tmp_path / ".child-start").exists()  # the clean start copy is removed after training
    keys = {n: json.loads((tmp_path / n / "stage.json").read_text())["key"] for n in done}
    assert "1/2 [" in (tmp_path / "child.log").read_text()
    capsys.readouterr()
    assert pipeline.run_stages(stages, tmp_path, tmp_path / "data", {"seq": 64}) == done
    assert capsys.readouterr().out.count("reusing") == 2
    assert {n: json.loads((tmp_path / n / "stage.json").read_text())["key"] for n in done} == keys
    with pytest.raises(StockRunError, match=r"stage broken failed \(exit 3\); log: .*broken\.log"):
        pipeline.run_stages([pipeline.Stage("broken", "minilm_teacher.yaml")], tmp_path, tmp_path, {})


def test_adapter_step_times_take_out_each_logged_pruning_step_once():
    """benchmarks/adapters.py: both adapters' ZipLM log lines are read (a line repeated by a second
    handler counts once), and their seconds leave the runtime, not the step count."""
    from benchmarks.adapters import pruning_step_seconds, step_times, verdict

    log = (
        "INFO - obert_modifiers.modifiers.ziplm - !ZipLMPruningModifier step 1: target 2x, predicted 2.01x "
        "(1.2 of 2.4 ms); heads [6], FFN [768]; 12.5 s\n"
        "!ZipLMPruningModifier step 1: target 2x, predicted 2.01x (1.2 of 2.4 ms); heads [6], FFN [768]; "
        "12.5 s\n"
        " 50%|#####     | 10/20 [00:05<00:05]\n"
        "2026 - INFO - obert_modifiers.native.modifiers.ziplm - !ZipLMPruningModifier step 2: target 3x, "
        "predicted 3x; heads [4], FFN [512]; 7.5 s\n"
    )
    assert pruning_step_seconds(log) == [12.5, 7.5]
    times = step_times(120.0, 50, [12.5, 7.5])
    assert times["step_s"] == pytest.approx(2.4) and times["step_outside_pruning_s"] == pytest.approx(2.0)
    assert times["pruning_steps"] == 2
    with pytest.raises(ValueError, match="no optimizer step"):
        step_times(1.0, 0, [])
    assert verdict(0.03, 0.05) == "met, 2.0 points to spare"
    assert verdict(0.08, 0.05) == "**missed** by 3.0 points"


def test_adapter_overhead_alternates_abba_and_takes_the_median_of_run_medians():
    from benchmarks._adapter_overhead import abba_order, overhead_summary

    assert abba_order(3) == ["plain", "native", "native", "plain", "plain", "native"]
    summary = overhead_summary(
        {"plain": [[1.0, 1.0, 9.0], [2.0, 2.0, 2.0]], "native": [[1.1, 1.1, 0.1], [2.1, 2.1, 2.1]]}
    )
    assert summary["repetition_medians_s"] == {"plain": [1.0, 2.0], "native": [1.1, 2.1]}
    assert summary["plain_median_s"] == pytest.approx(1.5)
    assert summary["native_median_s"] == pytest.approx(1.6)
    assert summary["overhead"] == pytest.approx(1.6 / 1.5 - 1)
    assert summary["overhead_per_repetition"] == pytest.approx([0.1, 0.05])


def test_a_remeasured_latency_table_retrains_the_ziplm_stages_only():
    """The ZipLM stages' structures come from the cached latency table: its digest is in their cache
    key (not in their command), so a new table retrains them, and leaves the teacher's key alone."""
    from benchmarks import structured

    cfg, z = dict(SETTINGS["full"]), structured.ZIPLM["full"]
    first = {s.name: s for s in structured.stages(cfg, z, 2, "table-a")[0]}
    second = {s.name: s for s in structured.stages(cfg, z, 2, "table-b")[0]}

    def keys(plan):
        out: dict[str, str] = {}
        for stage in plan.values():  # parents come first in the plan
            out[stage.name] = stage.key(out, {"seq": 64})
        return out

    a, b = keys(first), keys(second)
    retrained = {name for name in a if a[name] != b[name]}
    ziplm = {name for name, stage in first.items() if stage.recipe == "minilm_ziplm.yaml"}
    assert ziplm and ziplm <= retrained  # the family and both ablations
    assert {n for n in a if n.endswith("-int8") and n.startswith("ziplm")} <= retrained  # their children
    assert a["dense"] == b["dense"] and a["3L-80-block4-INT8"] == b["3L-80-block4-INT8"]
    assert all("latency_table" not in s.recipe_args for s in first.values())
    # without a digest the ZipLM stages key as they did before the field existed
    none = {s.name: s for s in structured.stages(cfg, z, 2)[0]}
    assert none["ziplm"].depends == {} and keys(none)["ziplm"] not in (a["ziplm"], b["ziplm"])
