"""Tiny models, data and trainers for the native adapter's tests (modern venv: transformers 5)."""

from __future__ import annotations

from pathlib import Path

import torch

torch.set_num_threads(1)

VOCAB, SEQ = 100, 12


class TinyData(torch.utils.data.Dataset):
    """``n`` random sequences whose label is a function of one token (learnable, deterministic)."""

    def __init__(self, n: int, seed: int = 0, seq: int = SEQ, pad_tail: bool = True):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, VOCAB, (n, seq), generator=generator)
        self.mask = torch.ones_like(self.ids)
        if pad_tail:  # some padding, so attention masks matter
            self.mask[::3, -3:] = 0
        self.labels = (self.ids[:, 1] > VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def tiny_model(family: str = "bert", layers: int = 4, dropout: float = 0.1, seed: int = 0):
    """A random ``...ForSequenceClassification`` of ``family`` (hidden 32, 2 heads, vocab 100)."""
    import transformers as tf

    common = {"vocab_size": VOCAB, "num_labels": 2, "max_position_embeddings": 64}
    if family == "bert":
        config = tf.BertConfig(
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            **common,
        )
        cls = tf.BertForSequenceClassification
    elif family == "roberta":
        config = tf.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
            pad_token_id=1,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            **{**common, "max_position_embeddings": 70},
        )
        cls = tf.RobertaForSequenceClassification
    elif family == "distilbert":
        config = tf.DistilBertConfig(
            dim=32,
            n_layers=layers,
            n_heads=2,
            hidden_dim=64,
            dropout=dropout,
            attention_dropout=dropout,
            **common,
        )
        cls = tf.DistilBertForSequenceClassification
    elif family == "modernbert":
        config = tf.ModernBertConfig(
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
            attention_dropout=dropout,
            mlp_dropout=dropout,
            **common,
        )
        cls = tf.ModernBertForSequenceClassification
    elif family == "deberta-v2":
        config = tf.DebertaV2Config(
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            **common,
        )
        cls = tf.DebertaV2ForSequenceClassification
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return cls(config)


def training_args(out: Path, **overrides):
    from transformers import TrainingArguments

    values = {
        "output_dir": str(out),
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-5,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def trainer(
    recipe, out: Path, model=None, data=None, recipe_args=None, teacher=None, model_recipe=None, **args
):
    from obert_modifiers.native import RecipeTrainer

    return RecipeTrainer(
        recipe=recipe,
        recipe_args=recipe_args,
        teacher=teacher,
        model_recipe=model_recipe,
        model=model if model is not None else tiny_model(),
        args=training_args(out, **args),
        train_dataset=data if data is not None else TinyData(32),
    )


def encoder_weights(model) -> dict[str, torch.Tensor]:
    return {
        n: p
        for n, p in model.named_parameters()
        if p.dim() == 2 and any(k in n for k in ("layer.", "layers."))
    }


def sparsity(tensors) -> float:
    tensors = list(tensors)
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


class StepRecorder:
    """A TrainerCallback that calls ``probe(trainer)`` after every optimizer step."""

    def __new__(cls, probe):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self):
                self.values = []

            def on_step_end(self, args, state, control, **kwargs):
                self.values.append((state.global_step, probe()))

        return _Recorder()
