"""Step-2 building blocks on tiny random models: block binarizer, block masks in compact
coordinates (forward and backward), the kept-weight count, and rounding up with revival."""

from __future__ import annotations

import math

import pytest
import torch

from mlpruning.core.errors import UserError
from pipeline.adapters import Geometry, geometry, layer_linears
from pipeline.pruning.binarizer import block_topk_mask, kept_count
from pipeline.pruning.block_masks import BlockScores, attach_blocks, build_indices
from pipeline.pruning.blocks import MATRICES, block_index, check_block_fits, kept_weights
from pipeline.pruning.masks import UNITS, detach_masks, unit_sizes
from pipeline.pruning.revive import magnitude_ranking, revive
from tests.conftest import random_bert

SHAPES = [  # (layers, heads, hidden, ffn, block)
    (2, 4, 64, 256, (16, 16)),
    (3, 2, 64, 128, (32, 32)),
    (1, 4, 128, 384, (32, 16)),
]


def _units(geo: Geometry, block: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    """Random step-1 masks (about 60-90% kept), rounded up to whole blocks as step 2 starts."""
    gen = torch.Generator().manual_seed(seed)
    units = {}
    for layer in range(geo.num_layers):
        for u, n in unit_sizes(geo).items():
            keep = torch.rand(n, generator=gen) < float(torch.empty(()).uniform_(0.6, 0.9, generator=gen))
            keep[int(torch.randint(n, (1,), generator=gen))] = True
            units[f"layer{layer}_{u}"] = keep
    return revive(units, geo, block, {k: torch.rand(v.shape, generator=gen) for k, v in units.items()})[0]


def _randomize(scores: BlockScores, gen: torch.Generator) -> None:
    with torch.no_grad():
        for k in scores.keys:
            scores.thresholds[k].fill_(float(torch.empty(()).uniform_(-3, 3, generator=gen)))
            scores.scores[k].copy_(torch.randn(scores.scores[k].shape, generator=gen))


def test_block_binarizer_keeps_the_top_k_live_blocks():
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.1], [9.0, 8.0, 7.0, 6.0], [0.5, 0.0, -0.2, 1.5]])
    live = torch.ones(3, 4, dtype=torch.bool)
    live[1] = False  # a dead block-row: its high scores must not win
    mask = block_topk_mask(scores, torch.tensor(0.0), live)  # sigmoid 0.5 of 8 live -> 4
    assert mask.tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]]
    balanced = block_topk_mask(scores, torch.tensor(0.0), live, row_balanced=True)  # 2 per live row
    assert balanced.tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]]
    t = torch.tensor(math.log(0.3 / 0.7))  # sigmoid 0.3: ceil(0.3 * 4) = 2 per row, ceil(2.4) = 3 in all
    assert block_topk_mask(scores, t, live, row_balanced=True).sum(1).tolist() == [2, 0, 2]
    assert int(block_topk_mask(scores, t, live).sum()) == kept_count(t, 8) == 3


@pytest.mark.parametrize("row_balanced", [False, True])
def test_block_binarizer_backward_is_straight_through(row_balanced):
    scores = torch.randn(4, 6, requires_grad=True)
    threshold = torch.tensor(0.3, requires_grad=True)
    live = torch.ones(4, 6, dtype=torch.bool)
    mask = block_topk_mask(scores, threshold, live, row_balanced)
    upstream = torch.arange(24.0).view(4, 6)
    (mask * upstream).sum().backward()
    assert torch.equal(scores.grad, upstream)  # dL/dS = dL/dM
    assert threshold.grad.item() == pytest.approx(float((upstream * mask.detach()).sum()))  # kept blocks


def _reference_weight(weight, units, geo, layer, matrix, blocks, block):
    """W with every step-1 and block mask applied, by explicit loops in compact coordinates."""
    index = block_index(units, geo, layer, matrix, block)
    out = torch.zeros_like(weight)
    bo, bi = block
    for r in range(weight.shape[0]):
        for c in range(weight.shape[1]):
            i, j = int(index.rows[r]), int(index.cols[c])
            if i < index.grid[0] and j < index.grid[1] and blocks[i, j]:
                out[r, c] = weight[r, c]
    # the same from first principles for Q: compact rows are kept heads' rows in ascending order
    if matrix == "query":
        heads = torch.nonzero(units[f"layer{layer}_heads"]).flatten()
        rows = torch.cat([torch.arange(h * geo.head_dim, (h + 1) * geo.head_dim) for h in heads])
        compact = torch.zeros(len(rows), weight.shape[1])
        for i in range(len(rows) // bo):
            for j in range(weight.shape[1] // bi):
                if blocks[i, j]:
                    compact[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi] = 1
        assert torch.equal(out[rows], weight[rows] * compact)
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_block_masks_forward_and_backward(shape):
    *dims, block = shape
    model = random_bert(*dims)
    geo = geometry(model)
    units = _units(geo, block, seed=1)
    indices = build_indices(units, geo, block)
    scores = BlockScores(indices)
    _randomize(scores, torch.Generator().manual_seed(2))
    raw = {
        (i, m): getattr(lin, m).weight.detach().clone()
        for i, lin in enumerate(layer_linears(model))
        for m in MATRICES
    }
    attach_blocks(layer_linears(model), scores, indices)
    layer, matrix = geo.num_layers - 1, "ffn_out"
    for i, lin in enumerate(layer_linears(model)):
        for m in MATRICES:
            blocks = scores.mask(f"layer{i}_{m}").detach()
            expected = _reference_weight(raw[i, m], units, geo, i, m, blocks, block)
            assert torch.equal(getattr(lin, m).weight, expected), (i, m)
    # backward: dL/dS_ij = sum over block (i, j) of W * dL/dW'
    lin = getattr(layer_linears(model)[layer], matrix)
    x = torch.randn(5, lin.in_features)
    g = torch.randn(5, lin.out_features)
    (lin(x) * g).sum().backward()
    grad_w = g.T @ x  # dL/dW'
    index = indices[f"layer{layer}_{matrix}"]
    expected = torch.zeros(index.grid)
    w = raw[layer, matrix]
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            i, j = int(index.rows[r]), int(index.cols[c])
            if i < index.grid[0] and j < index.grid[1]:
                expected[i, j] += w[r, c] * grad_w[r, c]
    assert torch.allclose(scores.scores[f"layer{layer}_{matrix}"].grad, expected, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("row_balanced", [False, True])
def test_analytic_kept_count_equals_masks_and_zeros(shape, row_balanced):
    *dims, block = shape
    gen = torch.Generator().manual_seed(sum(dims))
    for trial in range(3):
        model = random_bert(*dims, seed=trial)
        geo = geometry(model)
        units = _units(geo, block, seed=trial)
        indices = build_indices(units, geo, block)
        scores = BlockScores(indices, threshold_init=10.0, row_balanced=row_balanced)
        full = sum(int(ix.area().sum()) for ix in indices.values())
        assert float(scores.kept().detach()) == full  # sigmoid(10) keeps every live block
        _randomize(scores, gen)
        masks = {**units, **scores.freeze()}
        scores.unfreeze()
        analytic = float(scores.kept().detach())
        assert analytic == sum(kept_weights(masks, geo).values())
        attach_blocks(layer_linears(model), scores, indices)
        nonzero = sum(
            int((getattr(lin, m).weight != 0).sum()) for lin in layer_linears(model) for m in MATRICES
        )
        assert nonzero == analytic  # random weights are never exactly zero
        detach_masks(layer_linears(model))


def test_kept_count_gradient_reaches_every_threshold():
    model = random_bert(2, 4, 64, 256)
    geo = geometry(model)
    units = _units(geo, (16, 16), seed=0)
    scores = BlockScores(build_indices(units, geo, (16, 16)), threshold_init=1.0)
    scores.kept().backward()
    assert all(t.grad is not None and t.grad.item() > 0 for t in scores.thresholds.values())


def test_revival_rounds_up_with_the_next_best_rows():
    geo = Geometry(num_layers=1, num_heads=4, head_dim=16, hidden=64, intermediate=256)
    units = {f"layer0_{u}": torch.zeros(n, dtype=torch.bool) for u, n in unit_sizes(geo).items()}
    units["layer0_heads"][[0, 2]] = True
    units["layer0_ffn_in"][:37] = True  # 37 -> 64 = lcm(16, 32)
    units["layer0_attn_out"][::3] = True  # 22 -> 32
    units["layer0_ffn_out"][:32] = True  # already whole
    ranking = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in units.items()}
    out, revived = revive(units, geo, (32, 16), ranking)
    assert [int(out[f"layer0_{u}"].sum()) for u in UNITS] == [2, 32, 64, 32]
    assert "layer0_ffn_out" not in revived and "layer0_heads" not in revived
    for key, n_new in (("layer0_ffn_in", 27), ("layer0_attn_out", 10)):
        assert all(out[key][units[key]])  # every step-1 row stays
        pruned = torch.nonzero(~units[key]).flatten()
        best = pruned[torch.argsort(ranking[key][pruned], descending=True)[:n_new]]
        assert revived[key] == sorted(best.tolist())
        assert torch.equal(torch.nonzero(out[key] & ~units[key]).flatten(), torch.tensor(revived[key]))


def test_magnitude_ranking_prefers_the_larger_neuron():
    model = random_bert(1, 4, 64, 256)
    geo = geometry(model)
    lin = layer_linears(model)[0]
    with torch.no_grad():
        lin.ffn_in.weight[7] *= 10
        lin.ffn_out.weight[:, 7] *= 10
        lin.attn_out.weight[3] *= 10
    units = {
        k: torch.ones(n, dtype=torch.bool)
        for k, n in ((f"layer0_{u}", n) for u, n in unit_sizes(geo).items())
    }
    ranking = magnitude_ranking(layer_linears(model), units, geo)
    assert int(ranking["layer0_ffn_in"].argmax()) == 7
    assert int(ranking["layer0_attn_out"].argmax()) == 3


@pytest.mark.parametrize(
    ("block", "fragment"),
    [((32, 32), "does not divide the head dim 16"), ((16, 32), "head dim 16"), ((16, 48), "head dim")],
)
def test_block_must_divide_the_head_dim(block, fragment):
    geo = Geometry(num_layers=1, num_heads=4, head_dim=16, hidden=64, intermediate=256)
    with pytest.raises(UserError, match=fragment):
        check_block_fits(geo, block)
    check_block_fits(geo, (16, 8))  # rectangular blocks that divide are fine
    with pytest.raises(UserError, match="does not divide the FFN size 250"):
        check_block_fits(Geometry(1, 4, 16, 64, 250), (16, 16))
