from __future__ import annotations

import numpy as np

from pipeline.batching import bucketed_batches, collate, encode, sorted_batches
from pipeline.models import load_tokenizer
from pipeline.tasks import get_task, load_split


def test_bucketed_plan_covers_each_example_once_and_is_deterministic():
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 60, 1000)
    plan = bucketed_batches(lengths, 32, seed=7, epoch=0, pool_batches=4)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(1000))
    again = bucketed_batches(lengths, 32, seed=7, epoch=0, pool_batches=4)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again, strict=True))
    other = bucketed_batches(lengths, 32, seed=7, epoch=1, pool_batches=4)
    assert not all(np.array_equal(a, b) for a, b in zip(plan, other, strict=True))


def test_bucketing_cuts_padding_on_sst2():
    tok = load_tokenizer("minilm")
    enc = encode(tok, load_split(get_task("sst2"), "dev"), 128)
    lengths = enc.lengths
    plan = bucketed_batches(lengths, 32, seed=0, epoch=0, pool_batches=50)
    padded = sum(len(b) * lengths[b].max() for b in plan)
    random = np.random.default_rng(0).permutation(len(lengths))
    padded_random = sum(32 * lengths[random[i : i + 32]].max() for i in range(0, len(lengths), 32))
    assert padded < 0.8 * padded_random
    assert lengths.sum() / padded > 0.9


def test_collate_pads_to_longest_and_sorted_batches_cover_all():
    tok = load_tokenizer("minilm")
    enc = encode(tok, load_split(get_task("mrpc"), "dev"), 64)
    idx = np.array([0, 5, 9])
    batch = collate(enc, idx)
    width = max(len(enc.features["input_ids"][i]) for i in idx)
    assert batch["input_ids"].shape == (3, width)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    for r, i in enumerate(idx):
        n = len(enc.features["input_ids"][i])
        assert batch["attention_mask"][r].sum() == n
        assert (batch["input_ids"][r, n:] == enc.pad_id).all()
    assert int(batch["token_type_ids"].max()) == 1  # sentence pairs
    assert max(len(x) for x in enc.features["input_ids"]) <= 64
    flat = np.concatenate(sorted_batches(enc.lengths, 50))
    assert sorted(flat.tolist()) == list(range(len(enc)))
