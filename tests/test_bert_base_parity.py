"""Parity of the strip passes at BERT-base scale: a different head count in every layer.

A random BERT-base classifier (12 layers, 12 heads of 64, FFN 3072) keeps 1..12 heads (one
count per layer, shuffled), 40% of FFN rows and 75% of O/FFN-out output rows; exported,
stripped (output rows scattered) and compared with the masked PyTorch model on padded batches.
"""

from __future__ import annotations

import random

import pytest
import torch

from deploy.random_parity import random_parity
from graph_passes.optimize import optimize
from pipeline.export import export_onnx


@pytest.mark.slow
def test_bert_base_with_distinct_head_counts_matches_pytorch(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.adapters import geometry
    from pipeline.pruning.fixed import random_masks, write_masked

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2)).eval()
    heads = list(range(1, 13))
    random.Random(0).shuffle(heads)
    manifest = write_masked(
        model,
        random_masks(geometry(model), heads, 0.4, seed=0, out_rows_share=0.75),
        tmp_path / "masked",
        "sst2",
    )
    assert [layer["num_heads_kept"] for layer in manifest["layers"]] == heads
    export_onnx(tmp_path / "masked", tmp_path / "onnx")
    report = optimize(tmp_path / "onnx", tmp_path / "opt", scatter_rows="scatter")
    heads_pass, rows_pass, _, scatter_pass = report["passes"]  # no block masks: block pass idle
    assert heads_pass["rewrites"] == 11 and rows_pass["rewrites"] == 12 and scatter_pass["rewrites"] == 24
    diff = random_parity(
        tmp_path / "masked", tmp_path / "opt" / "model.onnx", ((1, 128), (3, 50)), seed=0, pad_from=0.5
    )
    assert diff <= 1e-4
