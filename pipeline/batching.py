"""Tokenization, length-bucketed batching and dynamic padding.

SST-2 sentences average 13 tokens; padding every batch to a fixed 128 would spend ~90% of the
compute on padding. Instead each batch is padded to its own longest example, and examples of
similar length are grouped:

1. shuffle all indices with a generator seeded by (seed, epoch);
2. cut the shuffled order into pools of ``pool_batches * batch_size`` examples;
3. sort each pool by length and cut it into batches;
4. shuffle the batches.

Step 1 keeps the epoch random, step 3 makes each batch nearly uniform in length, step 4 stops
the model seeing short-then-long runs. The plan depends only on (lengths, seed, epoch), so a
resumed run rebuilds it exactly and skips the batches already done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.tasks import Examples

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """Tokenized examples, unpadded: one id list per example and feature."""

    features: dict[str, list[list[int]]]
    labels: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.features["input_ids"]), dtype=np.int64)


def encode(tokenizer: PreTrainedTokenizerBase, examples: Examples, max_length: int) -> Encoded:
    columns = list(zip(*examples.texts, strict=True))
    pair = columns[1] if len(columns) > 1 else None
    enc = tokenizer(list(columns[0]), list(pair) if pair else None, truncation=True, max_length=max_length)
    keep = ("input_ids", "attention_mask", "token_type_ids")
    features = {k: list(v) for k, v in enc.items() if k in keep}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(features, np.asarray(examples.labels), pad_id)


def bucketed_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, pool_batches: int = 50
) -> list[np.ndarray]:
    """The epoch's batch plan (lists of example indices), deterministic in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    pool = pool_batches * batch_size
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches: sorted by length (least padding), every index once."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(
    encoded: Encoded, indices: np.ndarray, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Pad the chosen examples to the longest among them (on ``device``)."""
    import torch

    width = max(len(encoded.features["input_ids"][i]) for i in indices)
    batch: dict[str, torch.Tensor] = {}
    for key, rows in encoded.features.items():
        fill = encoded.pad_id if key == "input_ids" else 0
        out = torch.full((len(indices), width), fill, dtype=torch.long)
        for r, i in enumerate(indices):
            out[r, : len(rows[i])] = torch.as_tensor(rows[i])
        batch[key] = out.to(device)
    return batch
