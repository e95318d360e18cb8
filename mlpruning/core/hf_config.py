"""Facts read from a Hugging Face ``config.json`` by torch-free stages (optimize, bench, serve)."""

from __future__ import annotations

from typing import Any

ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")  # positions start after padding_idx


def position_limit(config: dict[str, Any]) -> int:
    """Longest sequence a model's position table takes, from its HF ``config.json`` (512 unknown)."""
    positions = int(config.get("max_position_embeddings") or 512)
    if config.get("model_type") in ROBERTA_LIKE:
        positions -= int(config.get("pad_token_id", 1)) + 1
    return positions
