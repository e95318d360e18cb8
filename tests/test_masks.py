"""Mask parametrizations, analytic vs counted remaining ratio, and the regularizer."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from pipeline.adapters import geometry, layer_linears
from pipeline.pruning.masks import UNITS, MaskScores, attach, detach_masks
from pipeline.pruning.regularizer import (
    adaptive_regularizer,
    counted_ratio,
    floor_ratio,
    layer_weights,
    remaining_ratio,
)
from tests.conftest import random_bert

SHAPES = [  # (layers, heads, hidden, ffn)
    (2, 4, 32, 64),
    (3, 6, 48, 200),
    (1, 12, 96, 384),
]


def _random_thresholds(scores: MaskScores, gen: torch.Generator) -> None:
    with torch.no_grad():
        for key in scores.thresholds:
            scores.thresholds[key].fill_(float(torch.empty(()).uniform_(-3, 3, generator=gen)))
            scores.scores[key].copy_(torch.randn(scores.scores[key].shape, generator=gen))


@pytest.mark.parametrize("shape", SHAPES)
def test_analytic_ratio_equals_ratio_counted_from_masks(shape):
    model = random_bert(*shape)
    scores = MaskScores(geometry(model), threshold_init=10.0)
    assert float(remaining_ratio(scores).detach()) == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        _random_thresholds(scores, gen)
        masks = scores.freeze()
        scores.unfreeze()
        assert float(remaining_ratio(scores).detach()) == pytest.approx(
            counted_ratio(masks, scores.geo), abs=1e-9
        )
        # and the count agrees with zeros actually present in the masked weights
        attach(layer_linears(model), scores)
        zeros = sum(
            int((getattr(lin, n).weight == 0).sum())
            for lin in layer_linears(model)
            for n in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
        )
        total = sum(
            getattr(lin, n).weight.numel()
            for lin in layer_linears(model)
            for n in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
        )
        assert 1 - zeros / total == pytest.approx(counted_ratio(masks, scores.geo), abs=1e-9)
        detach_masks(layer_linears(model))
        model = random_bert(*shape)


def test_regularizer_gradient_reaches_every_threshold():
    scores = MaskScores(geometry(random_bert(2, 4, 32, 64)), threshold_init=1.0)
    reg = adaptive_regularizer(remaining_ratio(scores), target=0.5, lambda_final=100.0, lambda_min=5.0)
    assert reg.lam == pytest.approx(max(100.0 * reg.gap / 0.25, 5.0))
    reg.penalty.backward()
    assert all(t.grad is not None and t.grad.item() > 0 for t in scores.thresholds.values())
    below = adaptive_regularizer(torch.tensor(0.4), 0.5, 100.0, 5.0)
    assert below.gap == 0.0 and float(below.penalty) == 0.0


def test_constant_threshold_grad_keeps_the_value_and_reaches_thresholds_at_10():
    geo = geometry(random_bert(2, 4, 32, 64))
    scores = MaskScores(geo, threshold_init=10.0)
    grads = {}
    for mode in ("sigmoid", "constant"):
        for t in scores.thresholds.values():
            t.grad = None
        r = remaining_ratio(scores, mode)
        assert float(r.detach()) == pytest.approx(1.0)
        r.backward()
        grads[mode] = {k: t.grad.item() for k, t in scores.thresholds.items()}
    # sigmoid'(10) = 4.5e-5: the reference regularizer barely reaches a threshold at its start
    assert max(grads["sigmoid"].values()) < 1e-4
    # constant slope 1/4: each threshold hears its matrix's share of the weights, unit by unit
    n = 4 * 32 * 32 + 2 * 32 * 64
    want = {"heads": 4 * 32 * 32, "attn_out": 32 * 32, "ffn_in": 2 * 32 * 64, "ffn_out": 32 * 64}
    want = {unit: weights / n for unit, weights in want.items()}
    for key, grad in grads["constant"].items():
        unit = key.split("_", 1)[1]
        assert grad == pytest.approx(0.25 * want[unit] / 2, rel=1e-6), key
    with pytest.raises(ValueError, match="threshold_grad"):
        remaining_ratio(scores, "linear")


def test_masked_forward_equals_manually_zeroed_model():
    model = random_bert(2, 4, 32, 64)
    reference = random_bert(2, 4, 32, 64)
    scores = MaskScores(geometry(model))
    _random_thresholds(scores, torch.Generator().manual_seed(3))
    masks = scores.freeze()
    attach(layer_linears(model), scores)
    d = 8
    with torch.no_grad():
        for i, lin in enumerate(layer_linears(reference)):
            h = masks[f"layer{i}_heads"].repeat_interleave(d)
            for n in ("query", "key", "value"):
                getattr(lin, n).weight.mul_(h[:, None])
                getattr(lin, n).bias.mul_(h)
            lin.attn_out.weight.mul_(masks[f"layer{i}_attn_out"][:, None] * h[None, :])
            lin.ffn_in.weight.mul_(masks[f"layer{i}_ffn_in"][:, None])
            lin.ffn_in.bias.mul_(masks[f"layer{i}_ffn_in"])
            lin.ffn_out.weight.mul_(masks[f"layer{i}_ffn_out"][:, None] * masks[f"layer{i}_ffn_in"][None, :])
    ids = torch.randint(0, 100, (3, 10))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-6)
    detach_masks(layer_linears(model))
    keys = set(model.state_dict())
    assert keys == set(reference.state_dict())  # plain HF keys again
    assert not any("parametrizations" in k for k in keys)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-6)


def test_masks_work_on_distilbert():
    torch.manual_seed(0)
    cfg = DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32
    )
    model = DistilBertForSequenceClassification(cfg).eval()
    scores = MaskScores(geometry(model), threshold_init=0.0)
    masks = scores.freeze()
    attach(layer_linears(model), scores)
    assert all(int(masks[f"layer0_{u}"].sum()) == n // 2 for u, n in zip(UNITS, (4, 32, 64, 32), strict=True))
    assert torch.isfinite(model(input_ids=torch.randint(0, 100, (2, 7))).logits).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_floor_lifts_r_back_to_the_target_keeping_the_threshold_order(shape):
    scores = MaskScores(geometry(random_bert(*shape)), threshold_init=10.0)
    _random_thresholds(scores, torch.Generator().manual_seed(7))
    thresholds = list(scores.thresholds.parameters())
    before = torch.stack([t.detach().clone() for t in thresholds])
    r0 = float(remaining_ratio(scores).detach())
    assert floor_ratio(thresholds, lambda: remaining_ratio(scores), min(r0 - 0.1, 0.05)) == 0.0  # above
    target = min(r0 + 0.2, 0.95)
    shift = floor_ratio(thresholds, lambda: remaining_ratio(scores), target)
    after = torch.stack([t.detach() for t in thresholds])
    assert shift > 0 and torch.allclose(after - before, torch.full_like(before, shift))
    r1 = float(remaining_ratio(scores).detach())
    unit = 4 * shape[2] * (shape[2] // shape[1]) / (shape[0] * layer_weights(scores.geo))  # one head
    assert abs(r1 - target) <= unit / 2 + 1e-9
