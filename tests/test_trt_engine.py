"""TensorRT build and engine runs, and provider choice in bench/verify.

What runs everywhere: the optimization-profile shapes, inlining the BlockSparseLinear functions
(the model TensorRT would parse runs in onnxruntime with the same logits), the plugin form and
its missing-plugin error, the 2:4 weight count, and the one-line errors without tensorrt or
onnxruntime-gpu. The real build is marked ``gpu`` and skips without tensorrt and CUDA.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from deploy.runtime import PROVIDERS, checked_provider
from deploy.signature import TensorSpec
from deploy.trt_engine import (
    BuildOptions,
    Profile,
    build_engine,
    inline_functions,
    prepare_onnx,
    profile_shapes,
    require_plugin,
    two_four_eligible,
)
from mlpruning.core.errors import UserError
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_triton import feeds, make_classifier


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _ort(model: onnx.ModelProto | str) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds())[0]


def test_profile_shapes_cover_batch_and_sequence():
    ids = TensorSpec("input_ids", TensorProto.INT64, (None, None))
    fixed = TensorSpec("lengths", TensorProto.INT64, (None, 4))
    shapes = profile_shapes([ids, fixed], Profile(batch=(1, 4, 16), seq=(8, 64, 256)))
    assert shapes == {
        "input_ids": ((1, 8), (4, 64), (16, 256)),
        "lengths": ((1, 4), (4, 4), (16, 4)),
    }
    with pytest.raises(ValueError, match="only \\[batch, sequence\\] may be dynamic"):
        profile_shapes([TensorSpec("x", TensorProto.FLOAT, (None, None, 8))], Profile())
    with pytest.raises(ValueError, match="batch must be MIN,OPT,MAX"):
        Profile(batch=(4, 2, 8))
    with pytest.raises(ValueError, match="seq must be MIN,OPT,MAX"):
        Profile(seq=(1, 128))


def test_inlined_model_runs_with_identical_outputs(tmp_path):
    folder = make_classifier(tmp_path / "m", block_sparse=True)
    original = onnx.load(str(folder / "model.onnx"))
    assert len(original.functions) == 1
    proto, prep = prepare_onnx(folder / "model.onnx", plugin=False)
    assert prep == {"block_sparse": "inlined", "functions": 1}
    assert not proto.functions and {n.domain for n in proto.graph.node} == {""}
    assert {o.domain for o in proto.opset_import} == {""}  # ai.mlpruning dropped with its last node
    onnx.checker.check_model(proto, full_check=True)
    np.testing.assert_allclose(_ort(proto), _ort(str(folder / "model.onnx")), rtol=0, atol=1e-5)
    plain = onnx.load(str(make_classifier(tmp_path / "dense") / "model.onnx"))
    assert inline_functions(plain).graph == plain.graph  # nothing to inline: unchanged


def test_plugin_form_and_missing_plugin_error(tmp_path):
    folder = make_classifier(tmp_path / "m", block_sparse=True)
    proto, prep = prepare_onnx(folder / "model.onnx", plugin=True)
    assert prep["block_sparse"] == "plugin" and prep["plugin_nodes"] == 1 and not proto.functions
    node = next(n for n in proto.graph.node if n.op_type == "BlockSparseLinear")
    assert node.domain == "trt.plugins"

    def fake_trt(creator: object) -> SimpleNamespace:
        registry = SimpleNamespace(get_creator=lambda name, version, namespace: creator)
        return SimpleNamespace(
            init_libnvinfer_plugins=lambda logger, ns: True, get_plugin_registry=lambda: registry
        )

    with pytest.raises(UserError, match="--plugin: no TensorRT plugin creator BlockSparseLinear v1") as err:
        require_plugin(fake_trt(None), None)
    assert "\n" not in str(err.value) and "drop --plugin" in str(err.value)
    require_plugin(fake_trt(object()), None)  # a registered creator passes


class FakeTrt:
    """The slice of the tensorrt module a build calls; records what the builder was asked for."""

    __version__ = "10.99-fake"
    BuilderFlag = SimpleNamespace(FP16="FP16", TF32="TF32", SPARSE_WEIGHTS="SPARSE_WEIGHTS", INT8="INT8")
    MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")

    class Logger:  # trt.Logger(trt.Logger.WARNING)
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    def __init__(self) -> None:
        self.flags, self.shapes, self.parsed = {"TF32"}, {}, None  # TF32 is on by default

    def Builder(self, logger: object) -> FakeTrt:
        return self

    def OnnxParser(self, network: object, logger: object) -> FakeTrt:
        return self

    def create_network(self, flags: int) -> str:
        return "network"

    def parse_from_file(self, path: str) -> bool:
        self.parsed = onnx.load(path)
        return True

    def create_builder_config(self) -> FakeTrt:
        return self

    create_optimization_profile = create_builder_config

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)

    def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
        self.shapes[name] = (low, opt, high)

    def add_optimization_profile(self, profile: object) -> None:
        pass

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.workspace = size

    def build_serialized_network(self, network: object, config: object) -> bytes:
        return b"plan"


@pytest.mark.parametrize(
    ("tf32", "flags"), [(False, {"FP16", "SPARSE_WEIGHTS"}), (True, {"FP16", "SPARSE_WEIGHTS", "TF32"})]
)
def test_build_asks_the_builder_for_the_options(tmp_path, monkeypatch, tf32, flags):
    """Through a recording fake: flags (TF32 cleared unless asked), profile, plan and report."""
    fake = FakeTrt()
    monkeypatch.setattr("deploy.trt_engine.import_tensorrt", lambda: fake)
    folder = make_classifier(tmp_path / "m", block_sparse=True)
    opts = BuildOptions(fp16=True, sparsity=True, profile=Profile((1, 2, 4), (1, 8, 16)), tf32=tf32)
    report = build_engine(folder, tmp_path / "out", opts)
    assert fake.flags == flags and fake.workspace == 4096 << 20
    assert fake.shapes["input_ids"] == ((1, 1), (2, 8), (4, 16)) and not fake.parsed.functions
    assert (tmp_path / "out" / "model.plan").read_bytes() == b"plan"
    saved = json.loads((tmp_path / "out" / "engine.json").read_text())
    assert saved == report and report["tf32"] is tf32 and report["block_sparse"] == "inlined"


def test_ops_outside_standard_onnx_are_refused(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = onnx.helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")
    graph = onnx.helper.make_graph([node], "g", [x], [y])
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)]
    (tmp_path / "m").mkdir()
    onnx.save(onnx.helper.make_model(graph, opset_imports=opsets), str(tmp_path / "m" / "model.onnx"))
    with pytest.raises(UserError, match=r"TensorRT cannot parse \(com.microsoft.FastGelu\).*--ort-fusion"):
        prepare_onnx(tmp_path / "m" / "model.onnx", plugin=False)


def test_two_four_weight_count():
    pattern = np.array([1.0, 0.0, 2.0, 0.0], np.float32)
    two_four = np.tile(pattern[:, None], (4, 8))  # [in 16, out 8]: 2 of every 4 along in
    dense = np.ones((16, 8), np.float32)
    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "A"], ["a"]),
        onnx.helper.make_node("MatMul", ["x", "B"], ["b"]),
        onnx.helper.make_node("Gemm", ["x", "C"], ["c"], transB=1),
        onnx.helper.make_node("Sum", ["a", "b", "c"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(w, n) for n, w in (("A", two_four), ("B", dense), ("C", two_four.T))
    ]
    proto = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y], inits))
    assert two_four_eligible(proto) == (2, 3)


@pytest.mark.skipif(_has("tensorrt"), reason="tensorrt is installed: the not-installed error cannot show")
def test_without_tensorrt_build_and_engine_runs_are_one_line_errors(tmp_path):
    folder = make_classifier(tmp_path / "m")
    assert_one_line_error(run_cli("build", str(folder), "--fp16"), "tensorrt is not installed: pip install")
    engine_only = tmp_path / "engine"
    engine_only.mkdir()
    (engine_only / "model.plan").write_bytes(b"\0")  # auto-detected: the folder has no model.onnx
    args = ("--batch", "1", "--seq", "8", "--rounds", "1", "--iters", "1")
    assert_one_line_error(run_cli("bench", str(engine_only), *args), "tensorrt is not installed")
    assert_one_line_error(run_cli("bench", str(folder), "--engine", *args), "has no model.plan")
    verify = ("verify", str(engine_only), "--reference", str(tmp_path))
    assert_one_line_error(run_cli(*verify), "tensorrt is not installed")  # before any torch work


def test_build_input_errors(tmp_path):
    folder = make_classifier(tmp_path / "m")
    assert_one_line_error(run_cli("build", str(folder), "--batch", "8,4,16"), "batch must be MIN,OPT,MAX")
    assert_one_line_error(run_cli("build", str(tmp_path / "nope")), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("build", str(tmp_path / "empty")), "holds neither model.onnx")


def test_bench_provider_is_checked_and_recorded(tmp_path):
    folder = make_classifier(tmp_path / "m")
    args = ("--batch", "1", "--seq", "8", "--rounds", "1", "--iters", "1")
    assert_one_line_error(
        run_cli("bench", str(folder), *args, "--provider", "tpu"), "provider must be one of"
    )
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        for cmd in (("bench", str(folder), *args), ("verify", str(folder), "--reference", str(tmp_path))):
            assert_one_line_error(run_cli(*cmd, "--provider", "cuda"), "install onnxruntime-gpu")
    out = tmp_path / "b.json"
    proc = run_cli("bench", str(folder), *args, "--baseline", str(folder), "--report", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert (
        report["environment"]["provider"]
        == report["environment"]["baseline_provider"]
        == "CPUExecutionProvider"
    )
    assert report["config"]["provider"] == "cpu" and report["config"]["engine"] is False


@pytest.mark.gpu
def test_build_engine_and_run_it_like_onnxruntime(tmp_path):
    pytest.importorskip(
        "tensorrt", reason="tensorrt is not installed (pip install tensorrt on a GPU machine)"
    )
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from deploy.bench import BenchConfig, bench
    from deploy.trt_engine import BuildOptions, TrtRunner, build_engine

    folder = make_classifier(tmp_path / "m", block_sparse=True)
    report = build_engine(folder, folder, BuildOptions(profile=Profile((1, 2, 4), (1, 8, 16))))
    assert report["block_sparse"] == "inlined" and (folder / "model.plan").is_file()
    got = TrtRunner(folder / "model.plan").run(None, feeds())[0]
    np.testing.assert_allclose(got, _ort(str(folder / "model.onnx")), rtol=1e-3, atol=1e-3)
    cfg = BenchConfig(batches=(1,), seqs=(8,), warmup=1, rounds=1, iters=1, engine=True)
    assert bench(folder, None, cfg)["environment"]["provider"] == "TensorRT"


def test_a_provider_that_fails_to_start_is_an_error_not_a_fallback():
    """ORT drops a GPU provider it cannot start and runs on the next one; we refuse that."""

    class Session:
        def __init__(self, providers: list[str]) -> None:
            self.providers, self.fallback = providers, True

        def get_providers(self) -> list[str]:
            return self.providers

        def disable_fallback(self) -> None:
            self.fallback = False

    cuda = PROVIDERS["cuda"]
    with pytest.raises(UserError, match="could not start CUDAExecutionProvider and fell back to CPU") as err:
        checked_provider(Session(["CPUExecutionProvider"]), cuda)
    assert "\n" not in str(err.value)
    started = checked_provider(Session(cuda), cuda)
    assert started.fallback is False  # a failure in run() raises instead of moving on
