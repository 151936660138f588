"""!OBertQuantizationModifier: fake-quantized training under SparseML's own manager and trainer,
masks kept exactly, structure re-applied on reload, recipe validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from _helpers import check, offline_env, run, stock_export_command, stock_train_command

torch = pytest.importorskip("torch", reason="needs torch (the [sparseml] or [modern] extra)")

QAT_RECIPE = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 2.0
  - !OBertQuantizationModifier
    start_epoch: {start}
    freeze_observer_epoch: {freeze}
    weight_strategy: {strategy}
"""

SENTENCES = [
    "A gripping, beautifully acted film.",
    "The plot wanders for an hour before anything happens.",
    "Shares rose after record profits.",
    "What a waste of a talented director.",
]


def encoder_linear_weights(model) -> dict:
    return {
        name: param
        for name, param in model.named_parameters()
        if ".encoder." in name and name.endswith("weight") and param.dim() == 2
    }


def prune_half(model) -> dict:
    """Zero the smaller half of every encoder Linear weight; return the keep-masks."""
    masks = {}
    with torch.no_grad():
        for name, weight in encoder_linear_weights(model).items():
            keep = weight.abs() > weight.abs().median()
            weight.mul_(keep)
            masks[name] = keep.clone()
    return masks


def load_tiny(model_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), attn_implementation="eager")
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def train_steps(model, tokenizer, manager, steps: int, steps_per_epoch: int = 4, lr: float = 5e-3):
    """Real optimizer steps through SparseML's ScheduledModifierManager (its own step wrapper)."""
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    labels = torch.tensor([i % model.config.num_labels for i in range(len(SENTENCES))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    wrapped = manager.modify(model, optimizer, steps_per_epoch=steps_per_epoch)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        wrapped.step()
        wrapped.zero_grad()
        losses.append(float(loss))
    model.eval()
    return losses


def make_qat_model_dir(source_dir: Path, out_dir: Path, *, strategy: str = "tensor", steps: int = 6) -> Path:
    """A pruned (50 %) tiny BERT trained a few QAT steps by our modifier under SparseML's manager,
    saved the way SparseML's trainer saves (pytorch_model.bin + recipe.yaml + tokenizer)."""
    import shutil

    from sparseml.pytorch.optim import ScheduledModifierManager

    torch.manual_seed(0)  # dropout: same trained weights every run
    model, tokenizer = load_tiny(source_dir)
    prune_half(model)
    manager = ScheduledModifierManager.from_yaml(QAT_RECIPE.format(start=0.0, freeze=1.0, strategy=strategy))
    train_steps(model, tokenizer, manager, steps)
    manager.finalize(model)
    out_dir.mkdir(parents=True)
    torch.save(model.state_dict(), out_dir / "pytorch_model.bin")
    model.config.save_pretrained(str(out_dir))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(source_dir / name, out_dir / name)
    manager.save(str(out_dir / "recipe.yaml"))
    return out_dir


# --------------------------------------------------------------------------------------------
# pure algorithm


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_symmetric_weight_fake_quant_keeps_zeros_exact(strategy):
    from obert_modifiers.algorithms.quantization import weight_fake_quant

    torch.manual_seed(0)
    weight = torch.randn(16, 8)
    weight[weight.abs() < 0.7] = 0.0
    fake_quant = weight_fake_quant(strategy, num_channels=16)
    quantized = fake_quant(weight)
    assert torch.equal(quantized[weight == 0], torch.zeros(int((weight == 0).sum())))
    assert int((quantized == 0).sum()) >= int((weight == 0).sum())
    # INT8: at most 255 distinct values per scale, and close to the input
    assert (quantized - weight).abs().max() <= fake_quant.scale.max() / 2 + 1e-6
    assert int(fake_quant.zero_point.abs().max()) == 0


def test_quantize_model_swaps_modules_shares_parameters_and_honours_exclude(tiny_bert_dir):
    from obert_modifiers.algorithms import quantization as qat

    model, tokenizer = load_tiny(tiny_bert_dir)
    query_before = model.bert.encoder.layer[0].attention.self.query.weight
    parameters_before = {id(p) for p in model.parameters()}
    plan = qat.quantize_model(model, exclude=["classifier", "bert.pooler", "Embedding"])
    layers = model.config.num_hidden_layers
    assert len(plan.linears) == 6 * layers
    assert len(plan.matmuls) == 2 * layers
    assert plan.embeddings == []
    assert set(plan.excluded) >= {"classifier", "bert.pooler.dense"}
    attention = model.bert.encoder.layer[0].attention.self
    assert isinstance(attention, qat.QuantizableBertSelfAttention)
    assert isinstance(attention.query, qat.QuantizedLinear)
    assert attention.query.weight is query_before  # optimizer references stay valid
    assert {id(p) for p in model.parameters()} == parameters_before
    assert type(model.classifier) is torch.nn.Linear
    assert type(model.bert.pooler.dense) is torch.nn.Linear
    assert type(model.bert.embeddings.word_embeddings) is torch.nn.Embedding
    # idempotent: a second call (structure re-applied) changes nothing
    again = qat.quantize_model(model, exclude=["classifier", "bert.pooler", "Embedding"])
    assert again.num_quantized == 0
    # the quantized model still computes sensible outputs
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (len(SENTENCES), model.config.num_labels)
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------
# the modifier under SparseML's ScheduledModifierManager


PRUNE_THEN_QAT_RECIPE = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 2.0
  - !ConstantPruningModifier
    params: ["re:bert.encoder.layer.*.(query|key|value|dense).weight"]
    start_epoch: 0.0
    end_epoch: 0.5
  - !OBertQuantizationModifier
    start_epoch: 0.5
    freeze_observer_epoch: 1.5
    weight_strategy: channel
"""


def test_qat_training_steps_keep_pruned_weights_exactly_zero(tiny_bert_dir):
    """SparseML's ConstantPruningModifier holds the masks until epoch 0.5 and then lets go; from
    there only our QAT modifier keeps the pruned weights at exactly 0 (AdamW would revive them)."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    from obert_modifiers.algorithms import quantization as qat
    from obert_modifiers.modifiers.quantization import OBertQuantizationModifier

    model, tokenizer = load_tiny(tiny_bert_dir)
    masks = prune_half(model)
    before = {n: w.detach().clone() for n, w in encoder_linear_weights(model).items()}
    manager = ScheduledModifierManager.from_yaml(PRUNE_THEN_QAT_RECIPE)
    modifier = [m for m in manager.modifiers if isinstance(m, OBertQuantizationModifier)][0]
    losses = train_steps(model, tokenizer, manager, steps=8, steps_per_epoch=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert qat.is_quantized(model) and modifier.plan is not None
    assert qat.observers_frozen(model)  # freeze_observer_epoch 1.5 reached at step 6
    for name, weight in encoder_linear_weights(model).items():
        pruned = ~masks[name]
        assert torch.equal(weight[pruned], torch.zeros(int(pruned.sum()))), name
        assert not torch.equal(weight, before[name]), f"{name} did not train"
    # the fake-quantized weights the forward pass uses are exactly zero there too
    linear = model.bert.encoder.layer[1].output.dense
    pruned = ~masks["bert.encoder.layer.1.output.dense.weight"]
    assert torch.equal(linear.quantized_weight()[pruned], torch.zeros(int(pruned.sum())))
    manager.finalize(model)


def test_without_our_masks_adamw_revives_pruned_weights(tiny_bert_dir):
    """Control for the test above: the same schedule with QAT starting only after training ends
    lets AdamW move pruned weights away from 0, so the exact zeros above are our modifier's doing."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    model, tokenizer = load_tiny(tiny_bert_dir)
    masks = prune_half(model)
    recipe = PRUNE_THEN_QAT_RECIPE.replace("start_epoch: 0.5\n    freeze", "start_epoch: 5.0\n    freeze")
    recipe = recipe.replace("freeze_observer_epoch: 1.5", "freeze_observer_epoch: 5.0")
    manager = ScheduledModifierManager.from_yaml(recipe)
    train_steps(model, tokenizer, manager, steps=8, steps_per_epoch=4)
    revived = sum(int((w[~masks[n]] != 0).sum()) for n, w in encoder_linear_weights(model).items())
    assert revived > 0
    manager.finalize(model)


def test_saved_qat_model_reloads_through_structure(tiny_bert_dir, tmp_path):
    """The modifier is structured: re-applying the saved recipe at epoch=inf rebuilds the fake-quant
    modules, so the checkpoint (scales, zero points included) loads strictly and gives the same
    outputs."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    from obert_modifiers.algorithms import quantization as qat

    folder = make_qat_model_dir(tiny_bert_dir, tmp_path / "qat")
    assert "!OBertQuantizationModifier" in (folder / "recipe.yaml").read_text()
    manager = ScheduledModifierManager.from_yaml(str(folder / "recipe.yaml"))
    assert any(m.__class__.__name__ == "OBertQuantizationModifier" for m in manager.structured_modifiers)
    assert manager.quantization_modifiers

    model, tokenizer = load_tiny(tiny_bert_dir)
    manager.apply_structure(model, epoch=float("inf"))
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    assert qat.observers_frozen(model)
    scale = model.bert.encoder.layer[0].attention.self.query.weight_fake_quant.scale
    assert torch.equal(scale, state["bert.encoder.layer.0.attention.self.query.weight_fake_quant.scale"])
    assert float(scale) != 1.0  # a trained scale, not the default


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("weight_strategy", "row", "'weight_strategy'"),
        ("end_epoch", "0.5", "'end_epoch'"),
        ("freeze_observer_epoch", "-0.5", "'freeze_observer_epoch'"),
        ("quantize_matmuls", "maybe", "'quantize_matmuls'"),
        ("exclude", "[1, 2]", "'exclude'"),
        ("weight_strategyy", "tensor", "did you mean 'weight_strategy'"),
    ],
)
def test_bad_recipe_values_fail_at_load_naming_the_key(key, value, fragment):
    from sparseml.pytorch.optim import ScheduledModifierManager

    recipe = f"""
modifiers:
  - !OBertQuantizationModifier
    start_epoch: 1.0
    {key}: {value}
"""
    with pytest.raises(Exception) as error:
        ScheduledModifierManager.from_yaml(recipe)
    assert fragment in str(error.value)
    assert "OBertQuantizationModifier" in str(error.value)


def test_recipe_composed_on_top_of_a_qat_model_still_loads():
    """Training further from a QAT model makes SparseML compose a staged recipe, which writes the
    QAT stage's last epoch into end_epoch; that recipe must load (and QAT must stay on)."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    base = ScheduledModifierManager.from_yaml(QAT_RECIPE.format(start=0.0, freeze=1.0, strategy="tensor"))
    extra = ScheduledModifierManager.from_yaml(
        "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: 1.0\n"
    )
    staged = ScheduledModifierManager.compose_staged(str(base), str(extra))
    reloaded = ScheduledModifierManager.from_yaml(str(staged))
    (qat_modifier,) = [
        m for m in reloaded.iter_modifiers() if m.__class__.__name__ == "OBertQuantizationModifier"
    ]
    assert qat_modifier.end_epoch == 2.0
    assert any(
        m.__class__.__name__ == "EpochRangeModifier" and m.start_epoch == 2.0
        for m in reloaded.iter_modifiers()
    )


def test_numeric_strings_are_accepted():
    from sparseml.pytorch.optim import ScheduledModifierManager

    manager = ScheduledModifierManager.from_yaml(
        "modifiers:\n  - !OBertQuantizationModifier\n    start_epoch: '1'\n    freeze_observer_epoch: 2e0\n"
    )
    modifier = manager.modifiers[0]
    assert modifier.start_epoch == 1.0 and modifier.freeze_observer_epoch == 2.0


# --------------------------------------------------------------------------------------------
# the stock SparseML console scripts


STOCK_RECIPE = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 1.0
  - !OBertQuantizationModifier
    start_epoch: 0.0
    freeze_observer_epoch: 0.5
"""


@pytest.fixture(scope="session")
def stock_qat_model_dir(tiny_bert_dir, bbc_data_dir, tmp_path_factory) -> Path:
    """A pruned tiny BERT trained by the STOCK ``sparseml.transformers.train.text_classification``
    console script with a recipe using ``!OBertQuantizationModifier`` (no wrapper, no import)."""
    work = tmp_path_factory.mktemp("stock-qat")
    start = work / "pruned"
    model, _ = load_tiny(tiny_bert_dir)
    masks = prune_half(model)
    model.save_pretrained(str(start), safe_serialization=False)
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(tiny_bert_dir / name, start / name)
    torch.save(masks, work / "masks.pt")
    recipe = work / "qat.yaml"
    recipe.write_text(STOCK_RECIPE)
    out = work / "trained"
    flags = ("--learning_rate", "5e-3", "--save_strategy", "no", "--save_safetensors", "False")
    command = stock_train_command(start, bbc_data_dir, out, recipe, *flags, batch_size=32)
    check(run(command, env=offline_env(), cwd=work, timeout=600), "stock training")
    return out


@pytest.mark.integration
def test_stock_training_cli_keeps_masks_and_stock_exporter_converts_to_int8(stock_qat_model_dir, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    folder = stock_qat_model_dir
    assert "!OBertQuantizationModifier" in (folder / "recipe.yaml").read_text()
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    masks = torch.load(folder.parent / "masks.pt", weights_only=True)
    assert any(k.endswith("weight_fake_quant.scale") for k in state), "QAT buffers were not saved"
    start = torch.load(folder.parent / "pruned" / "pytorch_model.bin", weights_only=True)
    trained = 0
    for name, keep in masks.items():
        assert torch.equal(state[name][~keep], torch.zeros(int((~keep).sum()))), name
        trained += int(not torch.equal(state[name], start[name]))
    assert trained == len(masks), "QAT did not update the weights"

    # stock exporter: copy the model folder (it writes deployment/ next to it)
    import shutil

    model_copy = tmp_path / "model"
    shutil.copytree(folder, model_copy)
    completed = run(stock_export_command(model_copy), env=offline_env(), cwd=tmp_path, timeout=600)
    check(completed, "stock export")
    onnx_path = tmp_path / "deployment" / "model.onnx"
    graph = onnx.load(str(onnx_path)).graph
    ops = [node.op_type for node in graph.node]
    layers = 4
    assert ops.count("MatMulInteger") >= 8 * layers  # 6 linears + 2 attention matmuls per layer
    assert "QuantizeLinear" in ops
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {i.name: np.ones((1, 64), dtype=np.int64) for i in session.get_inputs()}
    assert np.isfinite(session.run(None, feed)[0]).all()


# --------------------------------------------------------------------------------------------
# shared with test_export.py / test_bench.py: built once per session (this module is imported
# once, so the cache below is shared by every test file that imports it)

_SHARED: dict = {}


def make_sensitive_copy(tiny_bert_dir: Path, out_dir: Path) -> Path:
    """The tiny random BERT with its encoder/pooler/classifier matrices scaled 8x (std 0.16, like a
    trained model) so its logits are O(1) and react to a corrupted weight; at the default 0.02 the
    LayerNorms wash out even a scrambled layer (logit changes ~1e-3)."""
    import shutil

    model, _ = load_tiny(tiny_bert_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embeddings" not in name:
                param.mul_(8.0)
    model.save_pretrained(str(out_dir), safe_serialization=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(tiny_bert_dir / name, out_dir / name)
    return out_dir


def shared_artifacts(tiny_bert_dir: Path, tmp_path_factory) -> dict:
    """FP32 and INT8 deployment folders of the tiny BERT (INT8 from a pruned, QAT-trained copy
    saved as safetensors, which SparseML 1.8's own reload ignores)."""
    if not _SHARED:
        from safetensors.torch import save_file

        from obert_modifiers.export import export_deployment

        base = tmp_path_factory.mktemp("qat-artifacts")
        source = make_sensitive_copy(tiny_bert_dir, base / "tiny-bert-x8")
        qat_dir = make_qat_model_dir(source, base / "qat-model")
        state = torch.load(qat_dir / "pytorch_model.bin", weights_only=True)
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(qat_dir / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (qat_dir / "pytorch_model.bin").unlink()
        _SHARED["qat_dir"] = qat_dir
        _SHARED["source"] = source
        _SHARED["fp32"] = export_deployment(
            source, base / "fp32-deployment", sequence_length=64, progress=False
        )
        _SHARED["int8"] = export_deployment(
            qat_dir, base / "int8-deployment", sequence_length=64, progress=False
        )
    return _SHARED


# --------------------------------------------------------------------------------------------
# the INT32 bias grid: why the integer graph matches PyTorch


def test_int32_bias_is_on_the_grid_with_straight_through_gradient():
    from obert_modifiers.algorithms.quantization import int32_bias

    torch.manual_seed(0)
    bias = torch.randn(6, requires_grad=True)
    input_scale, weight_scale = torch.tensor([0.03]), torch.full((6,), 0.002)
    rounded = int32_bias(bias, input_scale, weight_scale)
    steps = rounded.detach() / (0.03 * 0.002)
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # integers of the grid
    assert (rounded.detach() - bias.detach()).abs().max() <= 0.5 * 0.03 * 0.002 + 1e-9
    assert not torch.equal(rounded.detach(), bias.detach())
    rounded.sum().backward()
    assert torch.equal(bias.grad, torch.ones(6))  # straight-through


def test_integer_graph_matches_pytorch_because_the_bias_grid_is_modelled(tmp_path):
    """SparseML's conversion adds each bias as INT32 on the grid input scale x weight scale. Our
    fake-quantized forward uses that same bias, so the exported MatMulInteger graph equals PyTorch
    to float rounding, while the layer with its float bias (QAT without the grid) is off by up to
    half a grid step: the shift that, compounded through 6 layers of activation rounding, moved the
    demo model's logits by 0.56."""
    import onnx
    import onnxruntime as ort
    from sparseml.pytorch.utils import export_onnx

    from obert_modifiers.algorithms.quantization import QuantizedLinear, bake_int32_biases, freeze_observers

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    with torch.no_grad():
        linear.weight.uniform_(-1, 1)
        linear.bias.uniform_(-3, 3)
    float_bias = linear.bias.detach().clone()
    model = QuantizedLinear(linear).train()
    for _ in range(20):  # calibrate the observers
        model(torch.randn(16, 32))
    freeze_observers(model)  # FakeQuantize observes in eval mode too until frozen
    model.eval()
    inputs = torch.randn(64, 32)
    with torch.no_grad():
        want = model(inputs)
        without_grid = torch.nn.functional.linear(
            model.input_quant(inputs), model.quantized_weight(), float_bias
        )
    step = float(model.input_quant.scale * model.weight_fake_quant.scale)
    path = tmp_path / "linear.onnx"
    export_onnx(model, torch.randn(2, 32), str(path), opset=14, convert_qat=True, dynamo=False)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "MatMulInteger" in ops and "MatMul" not in ops, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])
    on_grid_error = float((got - want).abs().max())
    off_grid_error = float((got - without_grid).abs().max())
    assert on_grid_error < 0.1 * step, (on_grid_error, step)
    assert 0.2 * step < off_grid_error <= 0.5 * step + 1e-6, (off_grid_error, step)
    # baking stores the forward's bias, so a QDQ graph with a float bias computes the same
    assert bake_int32_biases(model) == 1
    with torch.no_grad():
        assert torch.allclose(model(inputs), want, atol=1e-6)
        assert torch.allclose(model.bias / step, (model.bias / step).round(), atol=1e-3)
        assert not torch.equal(model.bias, float_bias)
