"""``!OBertPruningModifier`` driven by SparseML's own manager, optimizer wrapper and HF trainer."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import torch
from _helpers import stock_train_command

RECIPE = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: {epochs}
  - !{tag}
    params: ["re:bert.encoder.layer.*.(attention.self.query|intermediate.dense|output.dense).weight"]
    init_sparsity: {init}
    final_sparsity: {final}
    start_epoch: {start}
    end_epoch: {end}
    update_frequency: {frequency}
    num_grads: {num_grads}
    damp: 1e-7
    fisher_block_size: 16
    mask_type: {mask_type}
    global_sparsity: {global_sparsity}
"""


def recipe(
    tag="OBertPruningModifier",
    epochs=3.0,
    init=0.3,
    final=0.8,
    start=0.0,
    end=2.0,
    frequency=0.5,
    num_grads=8,
    mask_type="unstructured",
    global_sparsity=True,
) -> str:
    return RECIPE.format(**{k: v for k, v in locals().items()})


def tiny_model(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


DATA = torch.Generator().manual_seed(1)
IDS = torch.randint(0, 100, (256, 12), generator=DATA)
LABELS = torch.randint(0, 2, (256,), generator=DATA)


def grad_sampler(offset: int = 0) -> dict:
    """The trainer's grad_sampler interface: a loader builder yielding (args, kwargs, target)."""

    def builder(kwargs):
        batch = (kwargs or {}).get("batch_size", 2)
        while True:
            for i in range(offset, 256, batch):
                yield [], {"input_ids": IDS[i : i + batch], "labels": LABELS[i : i + batch]}, None

    return {"data_loader_builder": builder, "loss_function": lambda outputs, target: outputs.loss}


def ours(manager):
    from obert_modifiers.modifiers.obert_pruning import OBertPruningModifier

    return next(m for m in manager.modifiers if isinstance(m, OBertPruningModifier))


def train(model, manager, steps: int, steps_per_epoch: int = 8, start_step: int = 0, loggers=None):
    from sparseml.pytorch.optim import ScheduledOptimizer

    optimizer = ScheduledOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        model,
        manager,
        steps_per_epoch=steps_per_epoch,
        loggers=loggers,
        initialize_kwargs={"grad_sampler": grad_sampler()},
    )
    for step in range(start_step, start_step + steps):
        i = (step * 8) % 256
        model(input_ids=IDS[i : i + 8], labels=LABELS[i : i + 8]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def sparsity(weights) -> float:
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # SparseML's LoggerManager writes ./sparse_logs


# ---------------------------------------------------------------------------------- recipe keys
def test_recipe_keys_validated_at_load():
    from sparseml.pytorch.optim import ScheduledModifierManager

    from obert_modifiers.modifiers._base import RecipeParameterError

    bad = {
        "mask_type: unstructured": ("mask_type: block3x", "mask_type"),
        "fisher_block_size: 16": ("fisher_block_size: 10\n    mask_type: block4", "fisher_block_size"),
        "damp: 1e-7": ("damp: lots", "damp"),
        "final_sparsity: 0.8": ("final_sparsity: 0.1", "final_sparsity"),
        "num_grads: 8": ("num_grads: 0", "num_grads"),
        "update_frequency: 0.5": ("update_frequency: 0", "update_frequency"),
    }
    for old, (new, key) in bad.items():
        text = recipe().replace(old, new)
        if "mask_type: block4" in new:
            text = text.replace("    mask_type: unstructured\n", "")
        with pytest.raises(RecipeParameterError, match=f"OBertPruningModifier: recipe key '{key}'"):
            ScheduledModifierManager.from_yaml(text)


def test_published_recipe_keys_and_roundtrip():
    """A recipe written for SparseML's OBSPruningModifier loads by changing the tag; '1e-7' (a
    string to YAML) is a number; the recipe saved with a model reloads to the same modifier."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    published = recipe(tag="OBSPruningModifier").replace("num_grads: 8", "num_grads: 1024")
    published += "    leave_enabled: True\n    inter_func: cubic\n    num_recomputations: 1\n"
    published += "    grad_sampler_kwargs:\n      batch_size: 8\n"
    sparseml_manager = ScheduledModifierManager.from_yaml(published)
    manager = ScheduledModifierManager.from_yaml(
        published.replace("!OBSPruningModifier", "!OBertPruningModifier")
    )
    modifier = ours(manager)
    theirs = next(m for m in sparseml_manager.modifiers if type(m).__name__ == "OBSPruningModifier")
    assert modifier.damp == 1e-7 and isinstance(modifier.damp, float)
    for key in (
        "init_sparsity",
        "final_sparsity",
        "start_epoch",
        "end_epoch",
        "update_frequency",
        "params",
        "leave_enabled",
        "inter_func",
        "global_sparsity",
        "mask_type",
        "num_grads",
        "fisher_block_size",
        "grad_sampler_kwargs",
        "num_recomputations",
    ):
        assert getattr(modifier, key) == getattr(theirs, key), key
    again = ours(ScheduledModifierManager.from_yaml(str(manager)))
    assert again.props(only_serializable=True) == modifier.props(only_serializable=True)


@pytest.mark.parametrize(
    "name", ["obert_unstructured", "obert_block4", "obert_bert_base_30epochs_unstructured90"]
)
def test_shipped_recipes_load(name):
    from sparseml.pytorch.optim import ScheduledModifierManager

    path = Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml"
    manager = ScheduledModifierManager.from_yaml(str(path))
    modifier = ours(manager)
    assert modifier.damp == pytest.approx(1e-7) and modifier.final_sparsity in (0.8, 0.9)
    assert modifier.fisher_block_size % (4 if modifier.mask_type == "block4" else 1) == 0


def test_missing_grad_sampler_is_a_clear_error():
    from sparseml.pytorch.optim import ScheduledModifierManager

    manager = ScheduledModifierManager.from_yaml(recipe())
    with pytest.raises(RuntimeError, match="OBertPruningModifier needs gradients.*grad_sampler"):
        manager.initialize(tiny_model())


def test_infeasible_memory_budget_fails_at_initialize_naming_the_key():
    """A budget below what one pruning step needs is refused when SparseML's manager initializes
    the modifier (not hours later at the first pruning step), with the key and the smallest budget."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    text = recipe() + "    memory_budget_gb: 1.0e-6\n"
    manager = ScheduledModifierManager.from_yaml(text)
    assert ours(manager).memory_budget_gb == pytest.approx(1e-6)
    with pytest.raises(ValueError, match=r"memory_budget_gb.*smallest feasible budget is [0-9.e-]+ GB"):
        manager.initialize(tiny_model(), grad_sampler=grad_sampler())
    feasible = ScheduledModifierManager.from_yaml(recipe() + "    memory_budget_gb: 0.5\n")
    feasible.initialize(tiny_model(), grad_sampler=grad_sampler())  # a sufficient budget is accepted


# ---------------------------------------------------------------------------------- lifecycle
def test_gradual_pruning_schedule_masks_and_logs():
    from sparseml.pytorch.optim import ScheduledModifierManager
    from sparseml.pytorch.utils import LambdaLogger, LoggerManager

    logged = []

    def capture(tag, value, values, step, wall_time, level=None):
        logged.append((tag, value, step))
        return True

    model = tiny_model()
    manager = ScheduledModifierManager.from_yaml(recipe())
    modifier = ours(manager)
    train(model, manager, steps=3 * 8)
    # schedule: epochs 0, 0.5, 1.0, 1.5, 2.0 -> 5 pruning steps, final sparsity exactly 0.8
    assert modifier.pruning_steps_done == 5
    weights = [p for n, p in model.named_parameters() if n in modifier.param_names]
    assert len(weights) == 8  # query, attention.output.dense, intermediate.dense, output.dense x 2
    assert sparsity(weights) == pytest.approx(0.8, abs=1e-3)
    # after end_epoch, 8 more optimizer steps ran: leave_enabled kept every pruned weight at zero
    for w, keep in zip(weights, modifier.keep_masks, strict=False):
        assert torch.all(w[~keep] == 0)
    # logs reach SparseML's loggers: target/achieved sparsity, timings, per-layer sparsity
    model2 = tiny_model()
    manager2 = ScheduledModifierManager.from_yaml(recipe(epochs=1.0, end=0.5))
    train(model2, manager2, steps=8, loggers=LoggerManager([LambdaLogger(capture)], log_python=False))
    tags = {t for t, _, _ in logged}
    for tag in ("target_sparsity", "achieved_sparsity", "grad_collection_seconds", "inverse_seconds"):
        assert f"OBertPruningModifier/{tag}" in tags
    assert any(t.startswith("ParamPruning/bert.encoder.layer.0.intermediate.dense.weight") for t in tags)
    achieved = [v for t, v, _ in logged if t == "OBertPruningModifier/achieved_sparsity"]
    assert achieved[-1] == pytest.approx(0.8, abs=1e-3) and len(achieved) == 2


def test_leave_disabled_lets_weights_regrow():
    from sparseml.pytorch.optim import ScheduledModifierManager

    model = tiny_model()
    manager = ScheduledModifierManager.from_yaml(
        recipe().replace("global_sparsity: True", "global_sparsity: True\n    leave_enabled: False")
    )
    train(model, manager, steps=3 * 8)
    weights = [p for n, p in model.named_parameters() if n in ours(manager).param_names]
    assert sparsity(weights) < 0.5  # masks released at end_epoch: AdamW moves pruned weights


@pytest.mark.parametrize("mask_type", ["unstructured", "block4"])
def test_masks_agree_with_sparseml_obs(mask_type):
    """Same model, same gradients, same Fisher settings: SparseML's OBSPruningModifier and ours,
    both applied by SparseML's manager (one-shot), choose the same weights."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    model = tiny_model(2)
    results, names = {}, None
    for tag in ("OBSPruningModifier", "OBertPruningModifier"):
        pruned = copy.deepcopy(model)
        text = recipe(tag=tag, init=0.6, final=0.6, num_grads=32, mask_type=mask_type)
        manager = ScheduledModifierManager.from_yaml(text)
        manager.apply(pruned, grad_sampler=grad_sampler())
        if tag == "OBertPruningModifier":
            names = ours(manager).param_names
        results[tag] = {n: (p.detach() == 0) for n, p in pruned.named_parameters()}
    theirs = {n: results["OBSPruningModifier"][n] for n in names}
    mine = {n: results["OBertPruningModifier"][n] for n in names}
    assert len(mine) == 8
    total = sum(m.numel() for m in mine.values())
    agree = sum(int((theirs[n] == mine[n]).sum()) for n in mine) / total
    assert sum(int(m.sum()) for m in mine.values()) / total == pytest.approx(0.6, abs=0.01)
    assert agree >= 0.99


def test_state_dict_restores_masks_and_progress():
    from sparseml.pytorch.optim import ScheduledModifierManager

    model = tiny_model()
    manager = ScheduledModifierManager.from_yaml(recipe())
    train(model, manager, steps=9)  # pruning steps at epochs 0 and 0.5 (step 0 and 4), 8
    state = ours(manager).state_dict()
    assert state["steps_done"] == 3
    fresh = tiny_model()
    manager2 = ScheduledModifierManager.from_yaml(recipe())
    manager2.initialize(fresh, grad_sampler=grad_sampler())
    ours(manager2).load_state_dict(state)
    weights = [p for n, p in fresh.named_parameters() if n in ours(manager2).param_names]
    assert ours(manager2).pruning_steps_done == 3
    assert sparsity(weights) >= state["last_sparsity"][0] - 1e-3
    with pytest.raises(KeyError, match="missing masks"):
        ours(manager2).load_state_dict({"masks": {}})


def test_resume_continues_the_schedule():
    """SparseML restarts its step counter at 0 on resume but hands the checkpoint's epoch to
    apply_structure: a run stopped after its first pruning step and resumed (new manager, weights
    from the 'checkpoint') ends like the uninterrupted run."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    full_model = tiny_model()
    full = ScheduledModifierManager.from_yaml(recipe())
    train(full_model, full, steps=24)
    reference = ours(full)

    model = tiny_model()
    first = ScheduledModifierManager.from_yaml(recipe())
    train(model, first, steps=6)  # steps 0..5: pruning at epoch 0 and 0.5 (step 4)
    assert ours(first).pruning_steps_done == 2
    checkpoint = copy.deepcopy(model.state_dict())
    resumed_model = tiny_model()
    resumed_model.load_state_dict(checkpoint)
    resumed = ScheduledModifierManager.from_yaml(recipe())
    resumed.apply_structure(resumed_model, epoch=6 / 8)  # what the trainer does on resume
    train(resumed_model, resumed, steps=18, start_step=6)
    weights = [p for n, p in resumed_model.named_parameters() if n in ours(resumed).param_names]
    ref_weights = [p for n, p in full_model.named_parameters() if n in reference.param_names]
    assert ours(resumed).pruning_steps_done == reference.pruning_steps_done == 5
    assert sparsity(weights) == pytest.approx(sparsity(ref_weights), abs=1e-6)
    # without the resume epoch the schedule restarts and overshoots the end of training
    restarted_model = tiny_model()
    restarted_model.load_state_dict(checkpoint)
    restarted = ScheduledModifierManager.from_yaml(recipe())
    train(restarted_model, restarted, steps=18, start_step=6)
    assert ours(restarted).pruning_steps_done != 3


# ---------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from sparseml.pytorch.optim import ScheduledModifierManager

        import obert_modifiers  # noqa: F401  (registers the tag in the spawned process)

        model = tiny_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        manager = ScheduledModifierManager.from_yaml(recipe(epochs=1.0, end=0.5, frequency=0.25))
        from sparseml.pytorch.optim import ScheduledOptimizer

        optimizer = ScheduledOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-3),
            model,
            manager,
            steps_per_epoch=8,
            initialize_kwargs={"grad_sampler": grad_sampler(offset=rank * 64)},  # different data per rank
        )
        for step in range(8):
            i = (step * 16 + rank * 8) % 256
            ddp(input_ids=IDS[i : i + 8], labels=LABELS[i : i + 8]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        modifier = ours(manager)
        torch.save(
            {
                "masks": [m.clone() for m in modifier.keep_masks],
                "steps": modifier.pruning_steps_done,
                "num_grads": modifier.last_stats.num_grads,
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_ddp_two_processes_compute_identical_masks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert zero["steps"] == one["steps"] == 3
    # each rank sampled 4 gradients on its own data; the Fisher of both ranks saw all 8
    assert zero["num_grads"] == one["num_grads"] == 8
    for a, b in zip(zero["masks"], one["masks"], strict=False):
        assert torch.equal(a, b)
    kept = sum(int(m.sum()) for m in zero["masks"]) / sum(m.numel() for m in zero["masks"])
    assert kept == pytest.approx(0.2, abs=1e-3)
    for name, weight in zero["weights"].items():
        torch.testing.assert_close(weight, one["weights"][name])


# ---------------------------------------------------------------------------------- stock trainer
STOCK_RECIPE = """
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
    mask_type: block4
    grad_sampler_kwargs:
      batch_size: 4
"""


def _stock_command(model_dir, data_dir, out_dir, recipe_path, extra=()) -> list:
    flags = ("--save_safetensors", "False", "--seed", "7", *extra)
    return stock_train_command(model_dir, data_dir, out_dir, recipe_path, *flags, max_seq_length=32)


def _encoder_sparsity(model_dir: Path) -> float:
    state = torch.load(model_dir / "pytorch_model.bin", map_location="cpu")
    suffixes = ("dense.weight", "query.weight", "key.weight", "value.weight")
    keys = [k for k in state if "encoder.layer" in k and k.endswith(suffixes)]
    return sparsity([state[k] for k in keys])


@pytest.fixture(scope="module")
def small_bbc(bbc_data_dir, tmp_path_factory):
    """64 training rows: 4 steps per epoch at batch 16."""
    out = tmp_path_factory.mktemp("bbc64")
    for name in ("train", "validation"):
        lines = (bbc_data_dir / f"{name}.csv").read_text().splitlines()
        (out / f"{name}.csv").write_text("\n".join(lines[: 65 if name == "train" else 17]) + "\n")
    return out


@pytest.fixture(scope="module")
def stock_run(tiny_bert_dir, small_bbc, tmp_path_factory):
    """One uninterrupted stock training run with the tag (shared by the tests below)."""
    root = tmp_path_factory.mktemp("stock")
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(STOCK_RECIPE)
    out = root / "full"
    result = subprocess.run(
        _stock_command(tiny_bert_dir, small_bbc, out, recipe_path, ["--save_strategy", "no"]),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe_path, out


@pytest.mark.integration
def test_stock_text_classification_reaches_target_sparsity(stock_run):
    _, out = stock_run
    assert _encoder_sparsity(out) == pytest.approx(0.7, abs=0.01)
    assert "!OBertPruningModifier" in (out / "recipe.yaml").read_text()


# ---------------------------------------------------------------------------------- training state
def _seeded_grad_sampler(drawn: list) -> dict:
    """A grad_sampler whose builder shuffles with the DataLoader ``generator`` it is given (as the
    trainer's does); ``drawn`` gets the first sample's ids of every stream built."""
    from torch.utils.data import DataLoader, TensorDataset

    def builder(kwargs):
        loader = DataLoader(TensorDataset(IDS, LABELS), shuffle=True, **(kwargs or {}))
        first = True
        while True:
            for ids, labels in loader:
                if first:
                    drawn.append(ids[0].tolist())
                    first = False
                yield [], {"input_ids": ids, "labels": labels}, None

    return {"data_loader_builder": builder, "loss_function": lambda outputs, target: outputs.loss}


def _run_steps(model, manager, first: int, last: int, drawn: list, adam=None):
    from sparseml.pytorch.optim import ScheduledOptimizer

    adam = adam or torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = _seeded_grad_sampler(drawn)
    optimizer = ScheduledOptimizer(
        adam, model, manager, steps_per_epoch=8, initialize_kwargs={"grad_sampler": sampler}
    )
    for step in range(first, last):
        i = (step * 8) % 256
        model(input_ids=IDS[i : i + 8], labels=LABELS[i : i + 8]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return adam


def test_gradient_batches_are_a_function_of_the_step():
    """A run resumed after its first two pruning steps draws, at every later pruning step, the very
    gradient batches the uninterrupted run drew (the sampler's stream does not start afresh), and
    ends with the same masks."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    full_drawn: list = []
    full_model = tiny_model()
    full = ScheduledModifierManager.from_yaml(recipe())
    _run_steps(full_model, full, 0, 24, full_drawn)
    assert len(full_drawn) == 5 and len({tuple(d) for d in full_drawn}) == 5  # a new draw per step

    drawn: list = []
    model = tiny_model()
    first = ScheduledModifierManager.from_yaml(recipe())
    adam = _run_steps(model, first, 0, 6, drawn)  # pruning steps at steps 0 and 4
    checkpoint = copy.deepcopy(model.state_dict()), copy.deepcopy(adam.state_dict())
    resumed_model = tiny_model()
    resumed_model.load_state_dict(checkpoint[0])
    resumed_adam = torch.optim.AdamW(resumed_model.parameters(), lr=1e-3)
    resumed_adam.load_state_dict(checkpoint[1])
    resumed = ScheduledModifierManager.from_yaml(recipe())
    resumed.apply_structure(resumed_model, epoch=6 / 8)
    _run_steps(resumed_model, resumed, 6, 24, drawn, adam=resumed_adam)
    assert drawn == full_drawn
    for mine, reference in zip(ours(resumed).keep_masks, ours(full).keep_masks, strict=True):
        assert torch.equal(mine, reference)


def test_pruning_steps_train_on_their_batch():
    """The pruning step runs inside the optimizer step; the optimizer still updates every parameter
    with that step's training batch: as many Adam updates with pruning steps as without."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    no_pruning = "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: 3.0\n"
    counts = {}
    for name, text in (("pruning", recipe()), ("none", no_pruning)):
        model = tiny_model()
        manager = ScheduledModifierManager.from_yaml(text)
        adam = _run_steps(model, manager, 0, 12, [])
        counts[name] = sorted({int(adam.state[p]["step"]) for p in model.parameters()})
        if name == "pruning":
            assert ours(manager).pruning_steps_done == 3  # at steps 0, 4 and 8
    assert counts["pruning"] == counts["none"] == [12]
