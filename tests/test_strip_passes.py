"""Strip passes: how often they fire, the structure they leave, equality with the masked model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from deploy.random_parity import random_parity
from graph_passes.linears import find_linears
from graph_passes.optimize import optimize
from graph_passes.strip_heads import StripHeadsPass
from mlpruning.core.errors import UserError
from pipeline.export import export_onnx
from pipeline.pruning.checkpoint import load_masked


def test_structure_and_counts(masked, stripped, tmp_path):
    report = optimize(stripped / "onnx", tmp_path / "opt", scatter_rows="dense")
    manifest = json.loads((stripped / "onnx" / "pruning.json").read_text())
    heads, rows, _, scatter = report["passes"]
    pruned_head_layers = sum(1 for layer in manifest["layers"] if layer["num_heads_kept"] < 8)
    pruned_row_layers = sum(1 for layer in manifest["layers"] if layer["ffn_rows_kept"] < 256)
    assert heads["rewrites"] == pruned_head_layers > 0
    assert rows["rewrites"] == pruned_row_layers > 0
    assert rows["params_before"] == heads["params_after"]  # the passes run in sequence
    assert rows["params_after"] < rows["params_before"] < heads["params_before"]
    assert scatter["rewrites"] == 0 and scatter["skipped"]  # output rows were pruned, left dense
    model = ir.load(tmp_path / "opt" / "model.onnx")
    sites = find_linears(model, manifest)
    assert _explicit_head_counts(model) == [n for i in manifest["layers"] for n in [i["num_heads_kept"]] * 3]
    for layer, info in enumerate(manifest["layers"]):
        width = info["num_heads_kept"] * 8
        for name in ("query", "key", "value"):
            assert tuple(sites[(layer, name)].weight.shape) == (64, width)
            assert tuple(sites[(layer, name)].bias.shape) == (width,)
        assert tuple(sites[(layer, "attn_out")].weight.shape) == (width, 64)
        assert tuple(sites[(layer, "ffn_in")].weight.shape) == (64, info["ffn_rows_kept"])
        assert tuple(sites[(layer, "ffn_out")].weight.shape) == (info["ffn_rows_kept"], 64)
    onnx.checker.check_model(onnx.load(tmp_path / "opt" / "model.onnx"), full_check=True)
    assert json.loads((tmp_path / "opt" / "optimize.json").read_text()) == report


def test_stripped_model_equals_masked_pytorch(masked, stripped, tmp_path):
    optimize(stripped / "onnx", tmp_path / "opt")
    shapes = ((1, 7), (5, 31), (3, 96))
    assert random_parity(masked / "masked", tmp_path / "opt" / "model.onnx", shapes) <= 1e-4


def test_dense_manifest_changes_nothing(stripped, tmp_path):
    manifest = json.loads((stripped / "onnx" / "pruning.json").read_text())
    for layer in manifest["layers"]:
        layer["heads_kept"] = list(range(8))
    model = ir.load(stripped / "onnx" / "model.onnx")
    p = StripHeadsPass(manifest)
    p(model)
    assert p.report.rewrites == 0 and p.report.params_after == p.report.params_before
    # only the head axis of every Q/K/V Reshape became explicit: 8 heads, 3 reshapes per layer
    assert _explicit_head_counts(model) == [8] * 3 * len(manifest["layers"])


def _explicit_head_counts(model: ir.Model) -> list[int]:
    counts = []
    for node in model.graph:
        shape = node.inputs[1] if node.op_type == "Reshape" else None
        producer = shape.producer() if shape is not None else None
        if producer is not None and producer.name.endswith("heads_shape"):
            counts.append(int(producer.inputs[2].const_value.numpy()[0]))
    return counts


def test_missing_pieces_are_reported(stripped, tmp_path):
    manifest = json.loads((stripped / "onnx" / "pruning.json").read_text())
    manifest["adapter"]["prefix"] = "roberta"  # name scopes will not match
    p = StripHeadsPass(manifest)
    p(ir.load(stripped / "onnx" / "model.onnx"))
    assert p.report.rewrites == 0 and any("not found by name scope" in r for r in p.report.skipped)
    with pytest.raises(UserError, match="no model.onnx"):
        optimize(tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="is already optimized"):
        optimize(stripped / "opt", tmp_path / "again")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(stripped / "onnx", corrupt)
    (corrupt / "pruning.json").write_text('{"adapter": ')  # a truncated copy
    with pytest.raises(UserError, match=r"pruning.json is not valid JSON .*: re-run mlpruning export"):
        optimize(corrupt, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    model = corrupt / "model.onnx"
    model.write_bytes(model.read_bytes()[:200])  # an interrupted copy
    with pytest.raises(UserError, match=r"model.onnx is not a readable ONNX model"):
        optimize(corrupt, tmp_path / "out2")
    model.write_bytes(b"")
    with pytest.raises(UserError, match=r"model.onnx has no graph inputs or outputs"):
        optimize(corrupt, tmp_path / "out2")


def test_graph_passes_need_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\nclass B:\n    def find_spec(self, n, p=None, t=None):\n"
        "        if n == 'torch' or n.startswith('torch.'): raise ImportError(n)\n"
        "sys.meta_path.insert(0, B())\n"
        "import graph_passes.optimize, graph_passes.strip_rows\nprint('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_shared_initializers_behind_identity_are_copied_not_resized(masked, tmp_path):
    """Identical tensors (here all-zero biases) are exported as one initializer behind Identity
    nodes; slicing it for one layer must not resize it for the others."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = masked / "masked"
    ckpt = tmp_path / "zero-bias"
    shutil.copytree(src, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    for key in weights:
        if key.endswith(("query.bias", "key.bias", "value.bias", "intermediate.dense.bias")):
            weights[key] = torch.zeros_like(weights[key])
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    export_onnx(ckpt, tmp_path / "onnx")
    assert any(n.op_type == "Identity" for n in onnx.load(tmp_path / "onnx" / "model.onnx").graph.node)
    optimize(tmp_path / "onnx", tmp_path / "opt")
    session = ort.InferenceSession(str(tmp_path / "opt" / "model.onnx"), providers=["CPUExecutionProvider"])
    model, _, _ = load_masked(ckpt)
    ids = torch.randint(1000, 9000, (3, 19), generator=torch.Generator().manual_seed(2))
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }
    with torch.no_grad():
        want = model(**inputs).logits.numpy()
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    assert np.abs(got - want).max() <= 1e-4
