"""Encoder families the native adapter runs, and the weights oBERT prunes in each by default.

The patterns match the task models of transformers 5 (``...ForSequenceClassification``,
``...ForQuestionAnswering``, ...): the attention projections and the two FFN linears of every
encoder layer, never embeddings, the pooler or the head. A recipe's ``params`` may name them (the
repo's recipes read ``prune_params``; ``obert train`` fills it in for a family other than BERT).

| family | ``model_type`` | layer drop | attention-matmul QAT | notes |
|---|---|---|---|---|
| BERT | ``bert`` | yes | yes (attention registry) | |
| RoBERTa | ``roberta`` | yes | yes | |
| DistilBERT | ``distilbert`` | yes | yes | |
| ModernBERT | ``modernbert`` | yes (``layer_types`` trimmed) | yes | fused ``Wqkv`` |
| DeBERTa-v2/v3 | ``deberta-v2`` | yes | no (not through the registry) | linears, embeddings quantized |
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DEFAULT_PRUNE_PARAMS",
    "PRUNE_PARAMS_VARIABLE",
    "default_prune_params",
    "family_of",
    "with_family_defaults",
]

PRUNE_PARAMS_VARIABLE = "prune_params"  # the variable the repo's recipes read their oBERT params from

DEFAULT_PRUNE_PARAMS: dict[str, list[str]] = {
    "bert": [
        "re:bert.encoder.layer.*.(attention.self.(query|key|value)|attention.output.dense|intermediate.dense|"
        "output.dense).weight"
    ],
    "roberta": [
        "re:roberta.encoder.layer.*.(attention.self.(query|key|value)|attention.output.dense|intermediate.dense|"
        "output.dense).weight"
    ],
    "distilbert": [
        "re:distilbert.transformer.layer.*.(attention.(q_lin|k_lin|v_lin|out_lin)|ffn.(lin1|lin2)).weight"
    ],
    "modernbert": ["re:model.layers.*.(attn.(Wqkv|Wo)|mlp.(Wi|Wo)).weight"],
    "deberta-v2": [
        "re:deberta.encoder.layer.*.(attention.self.(query_proj|key_proj|value_proj)|attention.output.dense|"
        "intermediate.dense|output.dense).weight"
    ],
}


def family_of(model_or_config: Any) -> str | None:
    """The ``model_type`` of a model or config (``None`` when it has none)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None)


def default_prune_params(model_or_config: Any) -> list[str]:
    """The default oBERT ``params`` of the model's family; ValueError naming the families known."""
    family = family_of(model_or_config)
    if family not in DEFAULT_PRUNE_PARAMS:
        raise ValueError(
            f"no default pruning patterns for model_type {family!r} "
            f"(known: {', '.join(DEFAULT_PRUNE_PARAMS)}); "
            "give the recipe's params explicitly"
        )
    return list(DEFAULT_PRUNE_PARAMS[family])


def with_family_defaults(
    variables: dict[str, Any], recipe_args: dict[str, Any], model_or_config: Any
) -> dict[str, Any]:
    """``recipe_args`` with ``prune_params`` set to the model family's default patterns when the recipe
    has that variable, the caller did not set it, and the model is not a BERT (the repo's recipes
    name BERT's weights); unchanged otherwise."""
    family = family_of(model_or_config)
    if PRUNE_PARAMS_VARIABLE not in variables or PRUNE_PARAMS_VARIABLE in recipe_args or family == "bert":
        return dict(recipe_args)
    if family not in DEFAULT_PRUNE_PARAMS:
        return dict(recipe_args)  # unknown family: the recipe's own patterns (a miss is an error naming them)
    return {**recipe_args, PRUNE_PARAMS_VARIABLE: default_prune_params(model_or_config)}
