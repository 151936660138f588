"""A Hugging Face training script of your own, with an obert-modifiers recipe, on transformers 5 and
no SparseML (the native adapter, docs/native.md). The recipe is two lines: the RecipeTrainer in
place of the Trainer, and its ``recipe=``.

    python integrations/huggingface/native_trainer.py MODEL_DIR TRAIN_CSV OUT_DIR \\
        [--recipe recipes/minilm_6l_prune.yaml] [--recipe-args '{"num_grads": 64}'] [--teacher self]

TRAIN_CSV has the columns ``sentence,label`` (``obert data prepare`` writes such files).
"""

from __future__ import annotations

import argparse
import csv

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from obert_modifiers.native import RecipeTrainer, load_model


class CsvDataset(torch.utils.data.Dataset):
    def __init__(self, path: str, tokenizer, label2id: dict, max_length: int = 64):
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        self.encoded = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=max_length,
                                 padding="max_length", return_tensors="pt")  # fmt: skip
        self.labels = torch.tensor([label2id[r["label"]] for r in rows])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("train_csv")
    parser.add_argument("out_dir")
    parser.add_argument("--recipe", default="recipes/minilm_6l_prune.yaml")
    parser.add_argument("--recipe-args", default=None)
    parser.add_argument("--teacher", default=None, help="a model folder, 'self' or nothing")
    parser.add_argument("--batch-size", type=int, default=16)
    options = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(options.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(options.model_dir)
    train = CsvDataset(options.train_csv, tokenizer, model.config.label2id)
    args = TrainingArguments(output_dir=options.out_dir, per_device_train_batch_size=options.batch_size,
                             report_to=[], save_strategy="no", use_cpu=True)  # fmt: skip

    # the two lines: a RecipeTrainer where the Trainer was, and the recipe
    trainer = RecipeTrainer(recipe=options.recipe, recipe_args=options.recipe_args, teacher=options.teacher,
                            model=model, args=args, train_dataset=train,
                            processing_class=tokenizer)  # fmt: skip
    trainer.train()

    trainer.save_model()  # weights, tokenizer and recipe.yaml
    reloaded = load_model(options.out_dir)  # with the structure the recipe built (QAT, ZipLM shapes)
    sparsity = [
        float((p == 0).float().mean()) for n, p in reloaded.named_parameters() if n.endswith("dense.weight")
    ]
    print(f"saved {options.out_dir}: {reloaded.config.num_hidden_layers} layers, "
          f"mean sparsity of the dense weights {sum(sparsity) / len(sparsity):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
