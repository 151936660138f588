"""Latency-table files for tests: what ``obert latency-table --output`` writes on another machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def table_file(path: Path, config: Any, **key: Any) -> Path:
    """Write a table of ``config``'s shape (FLOP-counted entries) whose key says it was measured on
    another machine (``cpu`` "the deployment CPU", ``runtime_version`` 9.9.9); ``key`` overrides any
    field of the key (runtime, threads, sequence_length, the shape...)."""
    from obert_modifiers.algorithms.latency_search import LatencyKey
    from obert_modifiers.latency import DEFAULT_SETTING, flops_table

    fields = {
        **DEFAULT_SETTING,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "runtime_version": "9.9.9",
        "cpu": "the deployment CPU",
    }
    path.write_text(flops_table(LatencyKey(**{**fields, **key})).to_json())
    return path
