"""ONNX export: parity with PyTorch, dynamic axes, and the graph contract the strip passes use."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from mlpruning.core.errors import UserError
from pipeline.adapters import adapter_for
from pipeline.config import FinetuneConfig
from pipeline.export import export_onnx
from pipeline.finetune import Finetuner
from pipeline.pruning.checkpoint import load_masked
from tests.conftest import make_glue_dir, save_tiny


def _run(folder, batch):
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {k: batch[k].numpy() for k in names})[0]


def test_masked_export_matches_pytorch_on_new_shapes(masked, tmp_path):
    out = tmp_path / "onnx"
    report = export_onnx(masked / "masked", out)
    assert report["exporter"] == "torchscript" and report["parity_max_abs_diff"] <= 1e-4
    assert json.loads((out / "pruning.json").read_text()) == json.loads(
        (masked / "masked" / "pruning.json").read_text()
    )
    model, _, _ = load_masked(masked / "masked")
    gen = torch.Generator().manual_seed(0)
    for batch, seq in ((1, 5), (4, 23), (7, 64)):  # none of these is the traced shape
        ids = torch.randint(1000, 5000, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, seq // 2 :] = 0  # right padding on one row
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        with torch.no_grad():
            want = model(**inputs).logits.numpy()
        assert np.abs(_run(out, inputs) - want).max() <= 1e-4


def test_every_prunable_linear_is_found_by_name_scope_with_transposed_weight(masked, tmp_path):
    out = tmp_path / "onnx"
    export_onnx(masked / "masked", out)
    graph = onnx.load(out / "model.onnx").graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    model, masks, _ = load_masked(masked / "masked")
    adapter = adapter_for(model.config)
    state = model.state_dict()
    for layer in range(2):
        for path in adapter.linear_paths().values():
            scope = f"/bert/{adapter.layers.replace('.', '/')}.{layer}/{path.replace('.', '/')}/MatMul"
            nodes = [n for n in graph.node if n.op_type == "MatMul" and n.name == scope]
            assert len(nodes) == 1, scope
            weight = inits[nodes[0].input[1]]
            hf = state[f"bert.{adapter.layers}.{layer}.{path}.weight"].numpy()
            assert np.array_equal(weight, hf.T), scope  # stored as [in, out]
    heads = masks["layer0_heads"].repeat_interleave(8).numpy()
    q_node = next(n for n in graph.node if n.name == "/bert/encoder/layer.0/attention/self/query/MatMul")
    q = inits[q_node.input[1]]
    assert (q[:, ~heads] == 0).all() and (~heads).any()  # pruned heads are zero columns of W^T


def test_dense_and_distilbert_exports(tmp_path):
    glue = make_glue_dir(tmp_path / "glue")
    base = save_tiny(tmp_path / "distil", "distilbert")
    cfg = FinetuneConfig(
        task="sst2", model=str(base), epochs=1, batch_size=16, data_dir=str(glue), max_length=32
    )
    Finetuner(cfg, tmp_path / "teacher").run()
    report = export_onnx(tmp_path / "teacher", tmp_path / "onnx")
    assert report["inputs"] == ["input_ids", "attention_mask"] and report["parity_max_abs_diff"] <= 1e-4
    manifest = json.loads((tmp_path / "onnx" / "pruning.json").read_text())
    assert manifest["kind"] == "dense" and manifest["remaining_ratio"] == 1.0
    for name in ("config.json", "tokenizer.json", "export.json", "model.onnx"):
        assert (tmp_path / "onnx" / name).is_file(), name


def test_export_errors(tiny_bert, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export_onnx(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(UserError, match="neither a masked checkpoint nor a fine-tuned one"):
        export_onnx(tiny_bert, tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()
    with pytest.raises(UserError, match="unknown exporter 'onnxscript': use one of torchscript, dynamo"):
        export_onnx(tiny_bert, tmp_path / "out", exporter="onnxscript")
