"""Block search from weight zeros, and the figures for sparsity it cannot exploit."""

from __future__ import annotations

import time

import numpy as np
import pytest

from graph_passes.block_detect import CANDIDATES, detect, n_m_pattern, parse_block


def _blocked(shape: tuple[int, int], block: tuple[int, int], density: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    mask = rng.random((shape[0] // block[0], shape[1] // block[1])) < density
    wt = rng.standard_normal(shape).astype(np.float32) * np.kron(mask, np.ones(block, np.float32))
    return wt, mask


@pytest.mark.parametrize(
    ("shape", "block"),
    [((256, 512), (32, 32)), ((512, 256), (16, 16)), ((128, 192), (16, 32)), ((192, 128), (32, 16))],
)
def test_random_block_masks_are_found_exactly(shape, block):
    wt, mask = _blocked(shape, block, 0.3)
    found = detect(wt)
    assert found.block == block  # the largest shape that covers every zero, not a smaller tiling
    assert np.array_equal(found.kept, mask)
    assert found.coverage == 1.0 and found.block_density == pytest.approx(mask.mean())
    assert found.in_blocks == pytest.approx(found.zeros) and found.unstructured == 0.0


def test_ragged_and_empty_block_rows():
    wt, _ = _blocked((256, 256), (32, 32), 0.5, seed=3)
    wt[:, 0:32] = 0  # output block 0 keeps no block at all
    wt[:, 32:64] = 0
    wt[0:32, 32:64] = 1.0  # output block 1 keeps one
    found = detect(wt)
    assert found.block == (32, 32)
    assert found.kept[:, 0].sum() == 0 and found.kept[:, 1].sum() == 1
    assert len(set(found.kept.sum(axis=0).tolist())) > 2  # ragged counts per block-row


def test_a_dense_matrix_has_nothing_to_find():
    found = detect(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32) + 10)
    assert found.zeros == 0 and found.block is None and found.to_json()["block"] is None


def test_zeros_that_are_not_blocks_are_reported_by_pattern():
    rng = np.random.default_rng(1)
    unstructured = rng.standard_normal((128, 128)).astype(np.float32) * (rng.random((128, 128)) < 0.5)
    found = detect(unstructured)
    assert found.block is None and found.zeros == pytest.approx(0.5, abs=0.02)
    # random zeros also fall into runs of 4 (1/8 of them), which is no vector pattern
    assert found.unstructured == pytest.approx(found.zeros) and found.vector == 0
    assert found.n_m_pattern is None and found.vector_pattern is None

    two_four = rng.standard_normal((128, 64)).astype(np.float32) + 5
    for g in range(0, 128, 4):  # along the input axis, keep 2 of every 4
        for col in range(64):
            two_four[g + rng.choice(4, 2, replace=False), col] = 0
    found = detect(two_four)
    assert found.n_m_pattern == "2:4" and found.n_m == pytest.approx(0.5, abs=0.05)
    assert found.n_m + found.vector == pytest.approx(found.zeros) and found.unstructured == 0

    vectors = rng.standard_normal((64, 64)).astype(np.float32) + 5
    vectors[::2, 4:8] = 0  # 1x4 runs along the output axis, in every other input row
    found = detect(vectors)
    assert found.vector == pytest.approx(2 / 64) and found.vector_pattern == "1x4"
    assert found.block is None and found.unstructured == 0


def test_blocks_plus_scattered_zeros_split_the_shares():
    wt, _ = _blocked((256, 256), (32, 32), 0.5, seed=4)
    rng = np.random.default_rng(5)
    wt[rng.random(wt.shape) < 0.1] = 0  # unstructured zeros inside the kept blocks
    found = detect(wt)
    assert found.block == (32, 32)
    assert found.in_blocks + found.vector + found.n_m + found.unstructured == pytest.approx(found.zeros)
    assert 0 < found.unstructured < 0.1 and found.coverage < 1


def test_a_forced_block_shape_and_shapes_that_do_not_divide():
    wt, _ = _blocked((256, 256), (32, 32), 0.3)
    assert detect(wt, ((16, 16),)).block == (16, 16)
    assert detect(wt[:200, :200], CANDIDATES).block is None  # 200 is no multiple of 16


def test_n_m_pattern_is_the_strictest_that_holds():
    nonzero = np.zeros((8, 3), bool)
    nonzero[0] = nonzero[4] = True
    assert n_m_pattern(nonzero) == "1:4"
    nonzero[1] = True
    assert n_m_pattern(nonzero) == "2:4"


def test_parse_block():
    assert parse_block("auto") == "auto" and parse_block("None") == "none"
    assert parse_block("32") == (32, 32)
    assert parse_block("32x16") == (16, 32)  # rows x columns of W: 32 outputs, 16 inputs
    for bad in ("0", "x", "32x", "-4", "2000"):
        with pytest.raises(ValueError, match="--block"):
            parse_block(bad)


def test_search_is_fast_on_a_bert_base_encoder():
    rng = np.random.default_rng(0)
    weights = []
    for _ in range(12):
        weights += [rng.standard_normal((768, 768)).astype(np.float32) for _ in range(4)]
        weights += [_blocked((768, 3072), (32, 32), 0.1)[0], _blocked((3072, 768), (16, 16), 0.1)[0]]
    start = time.perf_counter()
    found = [detect(w) for w in weights]
    seconds = time.perf_counter() - start
    assert [f.block for f in found[:6]] == [None] * 4 + [(32, 32), (16, 16)]
    assert seconds < 5.0, f"block search took {seconds:.1f} s on BERT-base"
