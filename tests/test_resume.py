"""Training state through the STOCK ``sparseml.transformers.train.text_classification`` command with
an ``!OBertPruningModifier`` recipe (no learning-rate modifier, as in the README's example):

* a run killed with SIGKILL right after its first pruning step's checkpoint and resumed with
  ``--resume_from_checkpoint`` ends with the same masks, bit for bit, as the uninterrupted run;
* the learning rate the stepping optimizer holds is the one the trainer logs (a linear decay), and
  every checkpoint's ``optimizer.pt`` holds Adam's moments for every trained parameter
  (``compat.scheduled_optimizer_state``);
* a pruning step trains on its step's batch: every parameter gets one Adam update per training batch.

The runs are watched from inside by tests/plugins/train_probe (a ``sitecustomize`` on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _helpers import check, offline_env, run, stock_train_command

PROBE_DIR = Path(__file__).parent / "plugins" / "train_probe"
PROBE_LOG_ENV = "OBERT_TRAIN_PROBE_LOG"

PRUNED = re.compile(r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|(attention\.output|intermediate|output)\.dense)\.weight")  # noqa: E501
# 64 rows at batch 16: 4 steps per epoch, 8 in all; pruning steps at epochs 0, 0.5, 1.0, 1.5, i.e. in
# global steps 1, 3, 5 and 7 (the first one before checkpoint-1)
RECIPE = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 2.0
  - !OBertPruningModifier
    params:
      - re:bert.encoder.layer.*.attention.self.(query|key|value).weight
      - re:bert.encoder.layer.*.(attention.output|intermediate|output).dense.weight
    init_sparsity: 0.3
    final_sparsity: 0.7
    start_epoch: 0.0
    end_epoch: 1.5
    update_frequency: 0.5
    num_grads: 8
    damp: 1e-7
    fisher_block_size: 16
    grad_sampler_kwargs:
      batch_size: 4
"""
TOTAL_STEPS = 8
PRUNING_STEPS = 4


def probe_env(log: Path, **extra: str) -> dict[str, str]:
    """The offline environment with the training probe first on PYTHONPATH, logging to ``log``."""
    env = offline_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROBE_DIR), env.get("PYTHONPATH", "")) if p)
    env[PROBE_LOG_ENV] = str(log)
    return env


def probe_events(log: Path, event: str) -> list[dict]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == event]


def small_data(bbc_data_dir: Path, out: Path) -> Path:
    """64 training rows (4 steps per epoch at batch 16) and 16 validation rows."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", 64), ("validation", 16)):
        lines = (bbc_data_dir / f"{name}.csv").read_text().splitlines()
        (out / f"{name}.csv").write_text("\n".join(lines[: rows + 1]) + "\n")
    return out


def command(model_dir: Path, data_dir: Path, out: Path, recipe: Path, *extra: str) -> list[str]:
    flags = ("--save_safetensors", "False", "--seed", "7", "--logging_steps", "1")
    flags += ("--save_strategy", "steps", "--save_steps", "1", *extra)
    return stock_train_command(model_dir, data_dir, out, recipe, *flags, max_seq_length=32)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)


def optimizer_state(folder: Path) -> tuple[list[int], dict]:
    """(indices of the parameters in the optimizer's groups, per-parameter state) of ``optimizer.pt``."""
    saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    return [i for group in saved["param_groups"] for i in group["params"]], saved["state"]


def _complete(path: Path) -> bool:
    """``path`` holds a whole JSON document (the trainer may be half-way through writing it)."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir, bbc_data_dir) -> dict:
    """The uninterrupted run, and the same command killed right after checkpoint-1 and resumed."""
    root = tmp_path_factory.mktemp("resume")
    data = small_data(bbc_data_dir, root / "data")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)

    full = root / "full"
    full_log = root / "full.jsonl"
    check(run(command(tiny_bert_dir, data, full, recipe), probe_env(full_log), cwd=root), "uninterrupted run")

    killed = root / "killed"
    killed_log = root / "killed.jsonl"
    checkpoint = killed / "checkpoint-1"
    with open(root / "killed.out", "w") as output:
        process = subprocess.Popen(
            command(tiny_bert_dir, data, killed, recipe),
            env=probe_env(killed_log),
            cwd=root,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300
        # trainer_state.json is the last file of a checkpoint that the trainer writes
        while not _complete(checkpoint / "trainer_state.json") and process.poll() is None:
            assert time.time() < deadline, "no checkpoint-1 within 300 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, (root / "killed.out").read_text()[-3000:]
    killed_at = len(probe_events(killed_log, "step"))
    resumed = run(
        command(tiny_bert_dir, data, killed, recipe, "--resume_from_checkpoint", str(checkpoint)),
        probe_env(root / "resumed.jsonl"),
        cwd=root,
    )
    check(resumed, "resumed run")
    return {
        "full": full,
        "full_log": full_log,
        "killed": killed,
        "killed_at": killed_at,
        "resumed_log": root / "resumed.jsonl",
    }


@pytest.mark.integration
def test_killed_and_resumed_run_ends_with_bit_identical_masks(runs):
    assert runs["killed_at"] < TOTAL_STEPS  # the kill came before the end of training
    full, resumed = weights(runs["full"]), weights(runs["killed"])
    pruned = sorted(k for k in full if PRUNED.fullmatch(k))
    assert len(pruned) == 24  # 6 matrices in each of 4 layers
    for key in pruned:
        differ = int(((full[key] == 0) != (resumed[key] == 0)).sum())
        assert differ == 0, f"{key}: {differ} of {full[key].numel()} mask entries differ"
        assert float((resumed[key] == 0).float().mean()) == float((full[key] == 0).float().mean())
    total = sum(int((full[k] == 0).sum()) for k in pruned) / sum(full[k].numel() for k in pruned)
    assert total == pytest.approx(0.7, abs=0.01)
    # not only the masks: the resumed run is the uninterrupted one, weight for weight
    for key, tensor in full.items():
        assert torch.equal(tensor, resumed[key]), key
    # the resumed process ran the remaining steps only (it starts after checkpoint-1)
    assert len(probe_events(runs["resumed_log"], "step")) == TOTAL_STEPS - 1


@pytest.mark.integration
def test_logged_learning_rate_is_the_one_the_optimizer_steps_with(runs):
    """No LR modifier in the recipe: the trainer's linear decay is what AdamW steps with."""
    steps = probe_events(runs["full_log"], "step")
    logs = probe_events(runs["full_log"], "log")
    assert {s["optimizer"] for s in steps} == {"AdamW"} and len(steps) == TOTAL_STEPS
    assert [entry["step"] for entry in logs] == list(range(1, TOTAL_STEPS + 1))
    for entry in logs:
        assert entry["held"] == entry["logged"], entry
    # linear decay from --learning_rate (5e-5) to 0: each step used the rate logged after the one before
    used = [s["lr"] for s in steps]
    assert used == pytest.approx([5e-5 * (1 - i / TOTAL_STEPS) for i in range(TOTAL_STEPS)])
    assert used[1:] == [entry["logged"] for entry in logs[:-1]]


@pytest.mark.integration
def test_checkpoints_hold_adam_moments_for_every_trained_parameter(runs, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    trained = sum(1 for p in model.parameters() if p.requires_grad)
    for folder, step in ((runs["full"] / "checkpoint-1", 1), (runs["full"] / "checkpoint-4", 4)):
        indices, state = optimizer_state(folder)
        assert len(indices) == trained and sorted(state) == sorted(indices), folder
        for index in indices:
            assert {"exp_avg", "exp_avg_sq", "step"} <= set(state[index]), (folder, index)
            assert int(state[index]["step"]) == step
            assert float(state[index]["exp_avg_sq"].abs().sum()) > 0, (folder, index)


@pytest.mark.integration
def test_pruning_steps_train_on_their_batch(runs):
    """Steps 1, 3, 5 and 7 ran a pruning step; every parameter still got one Adam update per training
    batch (8), as in a run without pruning; the resumed run too (its moments came from checkpoint-1)."""
    assert PRUNING_STEPS == 4
    for folder in (runs["full"], runs["killed"]):
        _, state = optimizer_state(folder)
        assert {int(s["step"]) for s in state.values()} == {TOTAL_STEPS}, folder
        trainer_state = json.loads((folder / "trainer_state.json").read_text())
        assert trainer_state["global_step"] == TOTAL_STEPS


# ------------------------------------------------------------------------------ structured pruning
# ZipLM steps at epochs 0.5 and 1.0 (global steps 3 and 5): checkpoint-4 lies between them, on a model
# already shrunk once; FLOPs tables (no timing) keep it deterministic
ZIPLM_RECIPE = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 2.0
  - !ZipLMPruningModifier
    start_epoch: 0.5
    update_frequency: 0.5
    speedup_targets: [1.5, 2.0]
    num_calibration_samples: 16
    calibration_batch_size: 8
    latency_runtime: flops
    latency_sequence_length: 32
"""


@pytest.mark.integration
def test_a_run_resumed_between_two_structured_pruning_steps_ends_as_the_uninterrupted_one(
    tmp_path, tiny_bert_dir, bbc_data_dir
):
    data = small_data(bbc_data_dir, tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(ZIPLM_RECIPE)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    check(run(command(tiny_bert_dir, data, full, recipe), offline_env(), cwd=tmp_path), "uninterrupted run")
    checkpoint = full / "checkpoint-4"
    between = json.loads((checkpoint / "config.json").read_text())
    final = json.loads((full / "config.json").read_text())
    assert between["obert_ziplm"]["target_speedup"] == 1.5 and final["obert_ziplm"]["target_speedup"] == 2.0
    result = run(
        command(tiny_bert_dir, data, resumed, recipe, "--resume_from_checkpoint", str(checkpoint)),
        offline_env(),
        cwd=tmp_path,
    )
    check(result, "resumed run")
    assert json.loads((resumed / "config.json").read_text())["obert_structure"] == final["obert_structure"]
    expected, got = weights(full), weights(resumed)
    assert sorted(expected) == sorted(got)
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key
    # the family member of the first target, written at the second step, is the same model too
    for key, tensor in weights(full / "ziplm-1.5x").items():
        assert torch.equal(tensor, weights(resumed / "ziplm-1.5x")[key]), key
    assert "steps_done: 2" in (resumed / "recipe.yaml").read_text()
