"""Step 2 through the ONNX chain: block checkpoint -> export -> optimize -> same logits.

The session's tiny step-1 checkpoint (8 heads of 8, hidden 64, FFN 256) is block-pruned with
8x8 blocks for a few steps, exported at full size, stripped and rewritten with BlockSparseLinear
nodes (forced, so the test does not depend on timing), and compared with the masked PyTorch
model on padded batches of new shapes.
"""

from __future__ import annotations

import json

import onnx
import pytest

from deploy.random_parity import random_parity
from graph_passes.optimize import optimize
from pipeline.export import export_onnx


@pytest.fixture(scope="module")
def blocked(masked, tmp_path_factory):
    from pipeline.config import BlockPruneConfig
    from pipeline.pruning.block_pruner import BlockPruner

    root = tmp_path_factory.mktemp("blockchain")
    cfg = BlockPruneConfig(
        source=str(masked / "masked"),
        target=0.5,
        block="8",
        epochs=2,
        batch_size=16,
        threshold_init=0.3,  # prunes part of the blocks from the first step
        data_dir=str(masked / "glue"),
        max_length=32,
    )
    BlockPruner(cfg, root / "b8").run()
    export_onnx(root / "b8", root / "onnx")
    return root


def test_block_checkpoint_exports_and_runs_block_sparse(blocked, tmp_path):
    manifest = json.loads((blocked / "onnx" / "pruning.json").read_text())
    assert manifest["step"] == "block" and manifest["block"]
    report = optimize(blocked / "onnx", tmp_path / "opt", scatter_rows="dense", block_sparse="sparse")
    blocks = report["passes"][2]
    assert blocks["name"] == "block_sparse" and blocks["rewrites"] > 0
    assert blocks["params_after"] < blocks["params_before"]
    proto = onnx.load(tmp_path / "opt" / "model.onnx")
    assert sum(n.op_type == "BlockSparseLinear" for n in proto.graph.node) == blocks["rewrites"]
    onnx.checker.check_model(proto, full_check=True)
    assert random_parity(blocked / "b8", tmp_path / "opt" / "model.onnx", ((1, 9), (4, 33)), seed=3) <= 1e-4
