"""Physical shrinking of a BERT classifier (heads, FFN neurons, whole blocks): shapes, equality with the
masked dense model, exact save/reload (and the random-weights trap), ONNX export of a layer with every
head removed, with ONNX Runtime parity and pruned initializer shapes."""

from __future__ import annotations

import copy
import importlib.metadata
import json
from collections import Counter

import pytest
import torch

from obert_modifiers.algorithms import shrink
from obert_modifiers.errors import ObertError

HIDDEN, HEADS, FFN, LAYERS = 32, 4, 64, 4
HEAD_SIZE = HIDDEN // HEADS

# layer 0 untouched, layer 1 loses its attention block, layer 2 its FFN block, layer 3 is thinned
KEEP_HEADS = {1: [], 2: [1, 3], 3: [2]}
KEEP_FFN = {1: list(range(0, 60, 2)) + [60, 61, 62, 63], 2: [], 3: [1, 5, 9, 10, 33, 40, 41, 63]}


TRANSFORMERS_5 = int(importlib.metadata.version("transformers").split(".")[0]) >= 5


def _model(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=120,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=64,
        num_labels=3,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # BERT initialises biases to 0: randomise everything so stand-ins are tested
        for name, param in model.named_parameters():
            if "LayerNorm.weight" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.3)
    return model.eval()


def _inputs(seed: int = 1, batch: int = 3, seq: int = 12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, 8:] = 0  # padding exercises the attention mask
    types = torch.zeros(batch, seq, dtype=torch.long)
    types[:, seq // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _masked(model, heads, ffn, attention_weights=None, ffn_weights=None):
    """The dense model with removed heads/neurons zeroed in the output projections (same function)."""
    masked = copy.deepcopy(model)
    layers = masked.bert.encoder.layer
    with torch.no_grad():
        for index, kept in heads.items():
            dense = layers[index].attention.output.dense
            if attention_weights and index in attention_weights:
                dense.weight.copy_(attention_weights[index])
            for head in range(HEADS):
                if head not in kept:
                    dense.weight[:, head * HEAD_SIZE : (head + 1) * HEAD_SIZE] = 0.0
        for index, kept in ffn.items():
            dense = layers[index].output.dense
            if ffn_weights and index in ffn_weights:
                dense.weight.copy_(ffn_weights[index])
            for neuron in range(FFN):
                if neuron not in kept:
                    dense.weight[:, neuron] = 0.0
    return masked


def _shrunk():
    model = _model()
    dense = copy.deepcopy(model)
    shrink.shrink_model(model, KEEP_HEADS, KEEP_FFN)
    return dense, model


def test_shrink_gives_the_pruned_shapes_and_records_them():
    _, model = _shrunk()
    layers = model.bert.encoder.layer
    assert isinstance(layers[1].attention, shrink.RemovedAttention)
    assert isinstance(layers[2].output, shrink.RemovedOutput)
    assert isinstance(layers[2].intermediate, shrink.RemovedIntermediate)
    assert layers[0].attention.self.query.weight.shape == (32, 32)
    assert layers[2].attention.self.query.weight.shape == (16, 32)
    assert layers[2].attention.output.dense.weight.shape == (32, 16)
    assert layers[3].attention.self.value.weight.shape == (8, 32)
    assert layers[1].intermediate.dense.weight.shape == (34, 32)
    assert layers[1].output.dense.weight.shape == (32, 34)
    assert layers[3].output.dense.weight.shape == (32, 8)
    pruned = {k: sorted(v) for k, v in model.config.pruned_heads.items()}
    assert pruned == {1: [0, 1, 2, 3], 2: [0, 2], 3: [0, 1, 3]}
    assert model.config.obert_structure == {"format": 1, "heads": [4, 0, 2, 1], "ffn": [64, 34, 0, 8]}
    assert shrink.read_structure(model) == model.config.obert_structure


def test_shrunk_model_equals_the_masked_dense_model():
    dense, model = _shrunk()
    masked = _masked(dense, KEEP_HEADS, KEEP_FFN)
    inputs = _inputs()
    with torch.no_grad():
        want = masked(**inputs, output_hidden_states=True)
        got = model(**inputs, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if TRANSFORMERS_5:  # attention maps come from eager attention only, and a removed block has none
        model.set_attn_implementation("eager")
        with torch.no_grad():
            got = model(**inputs, output_attentions=True)
        assert [tuple(a.shape[1:2]) for a in got.attentions] == [(4,), (2,), (1,)]
    else:
        assert [tuple(a.shape[1:2]) for a in got.attentions] == [(4,), (0,), (2,), (1,)]
    # and the masking matters: the unmasked dense model is different
    assert not torch.allclose(dense(**inputs).logits, want.logits, atol=1e-3)


def test_shrink_writes_the_updated_output_projections():
    model = _model()
    dense = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    full_attention = torch.randn(HIDDEN, HIDDEN, generator=gen)
    full_ffn = torch.randn(HIDDEN, FFN, generator=gen)
    kept_cols = torch.cat([torch.arange(h * HEAD_SIZE, (h + 1) * HEAD_SIZE) for h in KEEP_HEADS[2]])
    ffn_cols = torch.tensor(KEEP_FFN[3])
    shrink.shrink_model(
        model,
        {2: KEEP_HEADS[2]},
        {3: KEEP_FFN[3]},
        attention_weights={2: full_attention[:, kept_cols]},
        ffn_weights={3: full_ffn[:, ffn_cols]},
    )
    masked = _masked(dense, {2: KEEP_HEADS[2]}, {3: KEEP_FFN[3]}, {2: full_attention}, {3: full_ffn})
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, masked(**inputs).logits, rtol=1e-5, atol=1e-5)
    message = "attention output of layer 0: the new weight is \\(32, 32\\)"
    with pytest.raises(shrink.ShrinkError, match=message):
        shrink.shrink_model(model, {0: [0]}, attention_weights={0: full_attention})
    message = "ffn_weights: layers \\[1\\] have weights but no kept ffn list"
    with pytest.raises(shrink.ShrinkError, match=message):
        shrink.shrink_model(model, ffn_weights={"1": full_ffn})


def test_repeated_shrinks_speak_current_indices_and_slices_map_parameters():
    model = _model()
    dense = copy.deepcopy(model)
    shrink.shrink_model(model, {2: [1, 3]}, {0: list(range(10, 40))})
    old_query = model.bert.encoder.layer[2].attention.self.query.weight
    old_inter = model.bert.encoder.layer[0].intermediate.dense.weight
    slices = shrink.shrink_model(model, {2: [1]}, {0: [0, 5, 29]})  # current head 1 = original head 3
    assert sorted(model.config.pruned_heads[2]) == [0, 1, 2]
    masked = _masked(dense, {2: [3]}, {0: [10, 15, 39]})
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, masked(**inputs).logits, rtol=1e-5, atol=1e-5)
    by_old = {id(s.old): s for s in slices}
    q = by_old[id(old_query)]
    assert q.dim == 0 and torch.equal(q.new, old_query.index_select(0, q.index))
    assert q.new is model.bert.encoder.layer[2].attention.self.query.weight
    i = by_old[id(old_inter)]
    assert i.index.tolist() == [0, 5, 29] and torch.equal(i.new, old_inter[[0, 5, 29]])
    message = "heads of layer 2: kept indices \\[1\\] must be distinct and in 0..0"
    with pytest.raises(shrink.ShrinkError, match=message):
        shrink.shrink_model(model, {2: [1]})


def test_save_and_reload_gives_identical_outputs(tmp_path):
    from transformers import BertForSequenceClassification

    _, model = _shrunk()
    inputs = _inputs()
    with torch.no_grad():
        want = model(**inputs).logits
    folder = shrink.save_shrunk_model(model, tmp_path / "shrunk")
    config = json.loads((folder / "config.json").read_text())
    assert config["obert_structure"]["ffn"] == [64, 34, 0, 8]
    again = shrink.load_shrunk_model(folder)
    assert type(again) is BertForSequenceClassification
    assert shrink.read_structure(again) == shrink.read_structure(model)
    assert isinstance(again.bert.encoder.layer[1].attention, shrink.RemovedAttention)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, want)
    assert shrink.apply_structure(again) is False  # already shaped: nothing to do

    # plain from_pretrained rebuilds per-layer FFN widths through the compat fix structure_config;
    # without it transformers fails with a size mismatch, never random weights (tests/test_compat.py)
    plain = BertForSequenceClassification.from_pretrained(folder).eval()
    assert isinstance(plain.bert.encoder.layer[1].attention, shrink.RemovedAttention)
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, want)


def test_heads_only_model_reloads_with_plain_from_pretrained(tmp_path):
    from transformers import BertForSequenceClassification

    model = _model()
    shrink.shrink_model(model, {0: [0, 2], 2: [], 3: [1]})
    inputs = _inputs()
    with torch.no_grad():
        want = model(**inputs).logits
    folder = shrink.save_shrunk_model(model, tmp_path / "heads")
    # transformers rebuilds the head counts from config.pruned_heads (the stand-in's state dict is the
    # zero-head block's), same outputs
    plain = BertForSequenceClassification.from_pretrained(folder).eval()
    ours = shrink.load_shrunk_model(folder)
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, want)
        assert torch.equal(ours(**inputs).logits, want)
    # the compat fix structure_config already swapped in the exportable stand-in while building it
    assert isinstance(plain.bert.encoder.layer[2].attention, shrink.RemovedAttention)
    assert shrink.apply_structure(plain) is False
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, want)


def test_reload_refuses_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    _, model = _shrunk()
    folder = shrink.save_shrunk_model(model, tmp_path / "shrunk")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["obert_structure"]["ffn"][3] = 16
    config_path.write_text(json.dumps(config))
    message = "shape mismatch: bert.encoder.layer.3.intermediate.dense.weight"
    with pytest.raises(shrink.ShrinkError, match=message) as info:
        shrink.load_shrunk_model(folder)
    assert isinstance(info.value, ObertError)
    config["obert_structure"]["ffn"][3] = 8
    config_path.write_text(json.dumps(config))
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    del state["bert.encoder.layer.0.output.dense.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(shrink.ShrinkError, match="missing: bert.encoder.layer.0.output.dense.weight"):
        shrink.load_shrunk_model(folder)
    config["obert_structure"]["heads"][0] = 3
    config_path.write_text(json.dumps(config))
    # transformers 4 re-applies config.pruned_heads, so the head count disagrees with the record;
    # transformers 5 builds what the record says, and the weights no longer fit
    message = (
        "shape mismatch: bert.encoder.layer.0.attention.self.query.weight"
        if TRANSFORMERS_5
        else "layer 0 has 4 heads but obert_structure records 3"
    )
    with pytest.raises(shrink.ShrinkError, match=message):
        shrink.load_shrunk_model(folder)


def test_shrunk_model_trains():
    _, model = _shrunk()
    model.train()
    out = model(**_inputs(), labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    grads = model.bert.encoder.layer[1].attention.output.dense.bias.grad  # the stand-in's bias learns
    assert grads is not None and torch.isfinite(grads).all() and grads.abs().sum() > 0


def _onnx_weight_shapes(path) -> Counter:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    shapes = Counter()
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim == 2 and "embeddings" not in init.name:
            shapes[tuple(sorted(array.shape))] += 1
    return shapes


def test_onnx_export_with_an_empty_attention_block_matches_pytorch(tmp_path):
    import onnxruntime as ort

    _, model = _shrunk()
    inputs = _inputs()
    path = tmp_path / "model.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(
        model,
        (inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]),
        str(path),
        input_names=names,
        output_names=["logits"],
        dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seq in ((3, 12), (1, 20)):
        feed = _inputs(seed=batch, batch=batch, seq=seq)
        (logits,) = session.run(None, {k: v.numpy() for k, v in feed.items()})
        with torch.no_grad():
            want = model(**feed).logits.numpy()
        assert abs(logits - want).max() < 1e-5

    # per-layer pruned matrices (orientation ignored): Q, K, V, out and the two FFN linears
    expected = Counter()
    for heads, ffn in zip([4, 0, 2, 1], [64, 34, 0, 8], strict=True):
        if heads:
            expected[tuple(sorted((HIDDEN, heads * HEAD_SIZE)))] += 4
        if ffn:
            expected[tuple(sorted((HIDDEN, ffn)))] += 2
    expected[(HIDDEN, HIDDEN)] += 1  # pooler
    expected[(3, HIDDEN)] += 1  # classifier
    assert _onnx_weight_shapes(path) == expected


def test_masked_lm_with_tied_decoder_reloads(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    torch.manual_seed(0)
    model = BertForMaskedLM(config).eval()
    shrink.shrink_model(model, {0: [1]}, {1: [3, 4]})
    ids = torch.randint(0, 100, (2, 7))
    folder = shrink.save_shrunk_model(model, tmp_path / "mlm")
    again = shrink.load_shrunk_model(folder)
    assert again.cls.predictions.decoder.weight is again.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_calibrate_search_and_shrink_fit_together():
    """Hessians from hooks -> per-layer databases -> search against a FLOPs table -> shrink with the
    OBS-updated weights: the model meets the target by the table and is closer to the dense model
    than the same structure shrunk without the OBS weights."""
    from obert_modifiers.algorithms import latency_search, structured_obs
    from obert_modifiers.latency import flops_table, shape_key

    model = _model()
    layers = model.bert.encoder.layer
    calibration = _inputs(seed=7, batch=16, seq=16)
    outs = {f"{i}.attention": layer.attention.output.dense for i, layer in enumerate(layers)}
    outs |= {f"{i}.ffn": layer.output.dense for i, layer in enumerate(layers)}
    with torch.no_grad(), structured_obs.input_hessians(outs) as hessians:
        model(**calibration)
    ffn_levels = list(range(0, FFN + 1, 8))
    databases = {}
    for name, linear in outs.items():
        attention = name.endswith("attention")
        databases[name] = structured_obs.structured_obs(
            linear.weight,
            hessians[name].hessian,
            HEAD_SIZE if attention else 1,
            None if attention else ffn_levels,
            chunk=1 if attention else 4,
        )
    table = flops_table(shape_key(model.config, runtime="flops", sequence_length=16), ffn_step=8)
    attention_errors = [databases[f"{i}.attention"].by_kept(relative=True) for i in range(LAYERS)]
    ffn_errors = [databases[f"{i}.ffn"].by_kept(relative=True) for i in range(LAYERS)]
    choice = latency_search.search_structure(table, attention_errors, ffn_errors, 2.0)
    assert choice.speedup >= 2.0

    heads, ffn, attention_weights, ffn_weights = {}, {}, {}, {}
    for i in range(LAYERS):
        att, mlp = databases[f"{i}.attention"], databases[f"{i}.ffn"]
        level_a, level_f = HEADS - choice.heads[i], FFN - choice.ffn[i]
        heads[i], ffn[i] = att.kept_groups(level_a), mlp.kept_groups(level_f)
        attention_weights[i], ffn_weights[i] = att.weight(level_a), mlp.weight(level_f)
    plain = copy.deepcopy(model)
    dense = copy.deepcopy(model)
    shrink.shrink_model(model, heads, ffn, attention_weights=attention_weights, ffn_weights=ffn_weights)
    shrink.shrink_model(plain, heads, ffn)
    structure = shrink.read_structure(model)
    assert structure["heads"] == choice.heads and structure["ffn"] == choice.ffn
    assert table.speedup(structure["heads"], structure["ffn"]) >= 2.0
    with torch.no_grad():
        want = dense(**calibration, output_hidden_states=True).hidden_states[1]
        obs = model(**calibration, output_hidden_states=True).hidden_states[1]
        zeroed = plain(**calibration, output_hidden_states=True).hidden_states[1]
    # the first layer sees exactly its calibration inputs: OBS must reconstruct it better
    assert choice.heads[0] < HEADS or choice.ffn[0] < FFN
    assert (obs - want).pow(2).mean() < (zeroed - want).pow(2).mean()
