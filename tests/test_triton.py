"""export-triton: the config names the model's real inputs, outputs, types and shapes; the
repository has Triton's layout; errors are one line.

The model is a tiny synthetic classifier with the signature of an exported encoder (int64
input_ids / attention_mask / token_type_ids [batch, sequence] -> float logits [batch, labels]),
optionally with a BlockSparseLinear node, so no training is needed. The config is parsed twice:
by Triton's own protobuf schema (``tritonclient[grpc]``, skipped when absent) and by the
structural reader that always runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploy.signature import TensorSpec, read_signature
from deploy.triton import TritonOptions, export_triton, model_config, parse_pbtxt, to_pbtxt
from graph_passes.block_sparse import replace_linear
from graph_passes.linears import LinearSite
from mlpruning.core.errors import UserError
from tests.test_cli import assert_one_line_error, run_cli

HIDDEN, VOCAB = 64, 5000  # bench feeds token ids up to 5000
SIGNATURE = {"input_ids": "TYPE_INT64", "attention_mask": "TYPE_INT64", "token_type_ids": "TYPE_INT64"}


def make_classifier(
    folder: Path, labels: int = 3, block_sparse: bool = False, batch: str | int = "batch"
) -> Path:
    """folder/model.onnx: masked mean of token + type embeddings -> two linears -> logits."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = {
        "tok": rng.standard_normal((VOCAB, HIDDEN)).astype(f32),
        "typ": rng.standard_normal((2, HIDDEN)).astype(f32),
        "W1": rng.standard_normal((HIDDEN, HIDDEN)).astype(f32),
        "W2": rng.standard_normal((HIDDEN, labels)).astype(f32),
        "axis1": np.array([1], np.int64),
        "last": np.array([-1], np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["tok", "input_ids"], ["e_tok"]),
        helper.make_node("Gather", ["typ", "token_type_ids"], ["e_typ"]),
        helper.make_node("Add", ["e_tok", "e_typ"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "W1"], ["hidden"], name="dense/MatMul"),
        helper.make_node("Relu", ["hidden"], ["act"]),
        helper.make_node("MatMul", ["act", "W2"], ["logits"], name="head/MatMul"),
    ]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, [batch, "sequence"]) for n in SIGNATURE]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, labels])]
    weights = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "tiny", ids, out, weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if block_sparse:
        model = ir.serde.deserialize_model(proto)
        mm = next(n for n in model.graph if n.name == "dense/MatMul")
        site = LinearSite(0, "dense", mm, mm.inputs[1], 1, None, None, -1)
        replace_linear(model, site, rng.random((4, 4)) < 0.5, (16, 16))
        proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(folder / "model.onnx"))
    labels_map = {str(k): f"label{k}" for k in range(labels)}
    (folder / "config.json").write_text(json.dumps({"id2label": labels_map, "max_position_embeddings": 64}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "export.json").write_text(json.dumps({"task": "sst2"}))
    return folder


def feeds(batch: int = 2, seq: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2 :] = 0  # padding in the first row
    return {
        "input_ids": rng.integers(0, VOCAB, (batch, seq)),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }


def triton_schema():
    """Triton's ModelConfig message class, or a skip naming the package that provides it."""
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient without its grpc extra raises RuntimeError
        pytest.skip("tritonclient[grpc] is not installed: Triton's ModelConfig schema is not available")
    return model_config_pb2


def _check_structure(config: dict, name: str, labels: int) -> None:
    assert config["name"] == name and config["max_batch_size"] == 32
    assert {i["name"]: i["data_type"] for i in config["input"]} == SIGNATURE
    assert all(i["dims"] == [-1] for i in config["input"])  # batch dim left to max_batch_size
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [labels]}]
    assert config["dynamic_batching"]["preferred_batch_size"] == [4, 8, 16]


def test_config_reads_the_onnx_signature_and_round_trips(tmp_path):
    inputs, outputs = read_signature(make_classifier(tmp_path / "m", labels=3) / "model.onnx")
    assert [t.name for t in inputs] == list(SIGNATURE) and inputs[0].dims == (None, None)
    assert outputs == [TensorSpec("logits", TensorProto.FLOAT, (None, 3))]
    config = model_config("tiny", inputs, outputs, TritonOptions())
    text = to_pbtxt(config)
    assert parse_pbtxt(text) == config  # regenerate-and-compare: what is written is what was meant
    _check_structure(parse_pbtxt(text), "tiny", 3)
    assert config["platform"] == "onnxruntime_onnx" and config["instance_group"][0]["kind"] == "KIND_CPU"


def test_config_parses_with_tritons_protobuf_schema(tmp_path):
    schema = triton_schema()
    from google.protobuf import text_format

    repo = tmp_path / "repo"
    proc = run_cli("export-triton", str(make_classifier(tmp_path / "m", labels=2)), "--out", str(repo))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["schema_checked"] is True
    config = text_format.Parse((repo / "m" / "config.pbtxt").read_text(), schema.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("m", "onnxruntime_onnx", 32)
    assert [(i.name, schema.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        (name, kind, [-1]) for name, kind in SIGNATURE.items()
    ]
    assert [(o.name, schema.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [
        ("logits", "TYPE_FP32", [2])
    ]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert schema.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
    from deploy.triton import schema_check

    with pytest.raises(ValueError, match="ModelConfig"):
        schema_check("name: 'x'\ninput [ { data_type: TYPE_INT65 } ]")


def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    make_classifier(run / "onnx" / "dense", labels=2)
    make_classifier(run / "opt" / "step1", labels=2, block_sparse=True)
    return run


def test_export_from_run_folder_writes_tritons_layout(tmp_path):
    run, repo = _run_folder(tmp_path), tmp_path / "repo"
    proc = run_cli("export-triton", str(run), "--out", str(repo))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    model = repo / "run_step1"  # the most pruned variant present, named after the run
    assert report["model"] == str(model) and report["variant"] == "step1"
    assert sorted(p.name for p in repo.iterdir()) == ["run_step1"]  # no staging left behind
    assert (model / "1" / "model.onnx").read_bytes() == (run / "opt" / "step1" / "model.onnx").read_bytes()
    assert sorted(p.name for p in (model / "tokenizer").iterdir()) == ["config.json", "tokenizer.json"]
    meta = json.loads((model / "mlpruning.json").read_text())
    assert meta["variant"] == "step1" and meta["block_sparse_functions"] == 1 and not meta["inlined"]
    assert meta["labels"] == {"0": "label0", "1": "label1"} and meta["task"] == "sst2"
    _check_structure(parse_pbtxt((model / "config.pbtxt").read_text()), "run_step1", 2)

    assert_one_line_error(run_cli("export-triton", str(run), "--out", str(repo)), "pass --overwrite")
    proc = run_cli("export-triton", str(run), "--out", str(repo), "--variant", "dense", "--name", "d")
    assert proc.returncode == 0 and (repo / "d" / "1" / "model.onnx").is_file(), proc.stderr
    assert_one_line_error(
        run_cli("export-triton", str(run), "--out", str(repo), "--variant", "step2"), "is not in"
    )


def test_inlined_model_gives_the_same_logits(tmp_path):
    import onnxruntime as ort

    folder = make_classifier(tmp_path / "m", block_sparse=True)
    repo = tmp_path / "repo"
    proc = run_cli("export-triton", str(folder), "--out", str(repo), "--inline-functions")
    assert proc.returncode == 0, proc.stderr
    inlined = onnx.load(str(repo / "m" / "1" / "model.onnx"))
    assert not inlined.functions and {n.domain for n in inlined.graph.node} == {""}
    assert json.loads((repo / "m" / "mlpruning.json").read_text())["inlined"] is True
    run = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds())[0]
        for p in (folder / "model.onnx", repo / "m" / "1" / "model.onnx")
    ]
    np.testing.assert_allclose(run[1], run[0], rtol=0, atol=1e-5)


def test_tensorrt_backend_uses_the_plan_and_its_profile(tmp_path):
    folder = make_classifier(tmp_path / "m")
    (folder / "model.plan").write_bytes(b"not a real engine")  # export-triton only copies it
    profile = {"batch": [1, 8, 16], "seq": [1, 64, 128]}
    (folder / "engine.json").write_text(json.dumps({"source": str(folder), "profile": profile}))
    repo = tmp_path / "repo"
    trt = ("export-triton", str(folder), "--out", str(repo), "--backend", "tensorrt")
    assert_one_line_error(run_cli(*trt), "exceeds the engine's profile (16)")
    assert_one_line_error(run_cli(*trt, "--device", "cpu"), "runs on GPUs only")
    proc = run_cli(*trt, "--max-batch-size", "16", "--preferred-batch", "8,16")
    assert proc.returncode == 0, proc.stderr
    config = parse_pbtxt((repo / "m" / "config.pbtxt").read_text())
    assert config["platform"] == "tensorrt_plan" and config["instance_group"][0]["kind"] == "KIND_GPU"
    assert config["max_batch_size"] == 16 and config["dynamic_batching"]["preferred_batch_size"] == [8, 16]
    assert (repo / "m" / "1" / "model.plan").read_bytes() == b"not a real engine"
    assert not (repo / "m" / "1" / "model.onnx").exists()
    for bad in ("{", json.dumps({"profile": {"batch": [1, 8]}})):  # corrupt, or an axis short
        (folder / "engine.json").write_text(bad)
        assert_one_line_error(run_cli(*trt), "rebuild the engine with mlpruning build")


def test_fixed_batch_and_missing_models(tmp_path):
    folder = make_classifier(tmp_path / "fixed", batch=1)
    assert_one_line_error(
        run_cli("export-triton", str(folder), "--out", str(tmp_path / "r")), "--max-batch-size 0"
    )
    proc = run_cli("export-triton", str(folder), "--out", str(tmp_path / "r"), "--max-batch-size", "0")
    assert proc.returncode == 0, proc.stderr
    config = parse_pbtxt((tmp_path / "r" / "fixed" / "config.pbtxt").read_text())
    assert "dynamic_batching" not in config and config["input"][0]["dims"] == [1, -1]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("export-triton", str(empty), "--out", str(tmp_path / "r")), "holds neither")
    shutil.copytree(folder, tmp_path / "noplan")
    assert_one_line_error(
        run_cli(
            "export-triton", str(tmp_path / "noplan"), "--out", str(tmp_path / "r"), "--backend", "tensorrt"
        ),
        "mlpruning build",
    )


def test_broken_folders_are_refused_before_anything_is_written(tmp_path):
    folder = make_classifier(tmp_path / "m")
    repo = tmp_path / "repo"
    model = folder / "model.onnx"
    cases = [
        (lambda: model.write_bytes(model.read_bytes()[:50]), "is not a readable ONNX model"),
        (lambda: model.write_bytes(b""), "has no graph inputs or outputs"),
        (lambda: (folder / "tokenizer.json").unlink(), "has no tokenizer files"),  # checked first
    ]
    for breaks, fragment in cases:
        breaks()
        with pytest.raises(UserError, match=fragment):
            export_triton(folder, repo, TritonOptions())
        assert not repo.exists()
