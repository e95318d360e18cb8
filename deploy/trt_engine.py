"""TensorRT: build ``model.plan`` from an optimized ONNX model, and run it for verify and bench.

tensorrt is optional and cannot be installed everywhere (it needs an NVIDIA GPU), so it is only
imported inside the functions that need it; without it they raise a one-line UserError.

Build (``build_engine``): the ONNX model is prepared first, then parsed and built:

- BlockSparseLinear nodes are model-local functions, one overload per node. onnx-tensorrt keys
  local functions by name only, so it would run the first body for every node: by default the
  functions are inlined (``onnx.inliner``; the result is plain ONNX, checked here against the
  original in onnxruntime). With ``plugin`` the nodes become TensorRT plugin calls instead
  (``graph_passes.block_sparse.to_tensorrt_plugin``) and a registered ``BlockSparseLinear``
  plugin creator is required up front: there is no plugin library yet, so that is an error now.
- One optimization profile covers every [batch, sequence] input: (min, opt, max) of each axis
  from ``Profile``; static dims stay as they are.
- ``fp16``: TensorRT 10 takes ``BuilderFlag.FP16`` (weak typing: FP16 kernels where faster).
  TensorRT 11 removed that flag (strong typing only), so there the graph itself is converted by
  ModelOpt AutoCast (fp16 compute, fp32 I/O) when nvidia-modelopt is installed, else an error.
- ``int8``: the model must be explicitly quantized, QuantizeLinear/DequantizeLinear pairs with
  signed int8 and zero points 0 (``mlpruning quantize --target tensorrt``); TensorRT then runs
  int8 where the pairs say (TensorRT 10: ``BuilderFlag.INT8`` set too; 11 reads the pairs
  alone). Dynamic-quantization ops (DynamicQuantizeLinear, MatMulInteger) are refused before
  tensorrt is imported: TensorRT cannot parse them, and ONNX Runtime's CUDA provider runs them
  slowly.
- ``sparsity`` sets ``SPARSE_WEIGHTS``: TensorRT then uses 2:4 sparse kernels for the weights
  that already are 2:4 (at most 2 non-zeros in every 4 along the reduction axis). Block and row
  pruning does not make weights 2:4 by itself; the report counts how many qualify.

The plan is written atomically, then ``engine.json`` (options, profile, I/O, versions) beside it.

Run (``TrtRunner``): the runner interface of :mod:`deploy.runners` (``get_inputs``, ``run``),
with buffers as torch CUDA tensors on one stream; shapes outside the profile are a UserError.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from deploy.engine_report import ENGINE_REPORT
from deploy.runtime import model_path
from deploy.signature import TensorSpec, signature
from mlpruning import __version__
from mlpruning.core.atomic import write_json, write_with
from mlpruning.core.contract import ONNX_FILE, PLAN_FILE
from mlpruning.core.errors import UserError

log = logging.getLogger(__name__)

ENGINE_PROVIDER = "TensorRT"
PLUGIN = ("BlockSparseLinear", "1", "")  # name, version, namespace (to_tensorrt_plugin's defaults)
NOT_INSTALLED = (
    "tensorrt is not installed: pip install tensorrt on a machine with an NVIDIA GPU "
    "(or use --provider cuda with onnxruntime-gpu)"
)


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise UserError(NOT_INSTALLED) from None
    return tensorrt


@dataclass(frozen=True)
class Profile:
    """(min, opt, max) of the batch and sequence axes of every [batch, sequence] input."""

    batch: tuple[int, int, int] = (1, 8, 64)  # 64: the chunk verify runs the dev set in
    seq: tuple[int, int, int] = (1, 128, 512)

    def __post_init__(self) -> None:
        for name, dims in (("batch", self.batch), ("seq", self.seq)):
            if len(dims) != 3 or not 1 <= dims[0] <= dims[1] <= dims[2]:
                raise ValueError(f"{name} must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {dims}")


def profile_shapes(inputs: list[TensorSpec], profile: Profile) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per input, its (min, opt, max) shapes; a symbolic dim outside [batch, sequence] is an error."""
    shapes = {}
    for spec in inputs:
        if len(spec.dims) != 2 and None in spec.dims:
            raise ValueError(f"input {spec.name} has dims {spec.dims}: only [batch, sequence] may be dynamic")
        axes = (profile.batch, profile.seq)
        shapes[spec.name] = tuple(
            tuple(axes[i][k] if d is None else d for i, d in enumerate(spec.dims)) for k in range(3)
        )
    return shapes


def inline_functions(proto: Any) -> Any:
    """``proto`` with every model-local function inlined and the unused custom opset dropped."""
    import onnx.inliner

    out = onnx.inliner.inline_local_functions(proto)
    used = {node.domain for node in out.graph.node}
    kept = [o for o in out.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out


def plugin_form(proto: Any) -> tuple[Any, int]:
    """BlockSparseLinear nodes as TensorRT plugin calls; returns the model and how many."""
    import onnx_ir as ir

    from graph_passes.block_sparse import to_tensorrt_plugin

    model = ir.serde.deserialize_model(proto)
    count = to_tensorrt_plugin(model, plugin_name=PLUGIN[0], plugin_version=PLUGIN[1])
    return ir.serde.serialize_model(model), count


def require_plugin(trt: Any, logger: Any) -> None:
    """One-line error unless a BlockSparseLinear plugin creator is registered with TensorRT."""
    trt.init_libnvinfer_plugins(logger, "")
    registry = trt.get_plugin_registry()
    lookup = getattr(registry, "get_creator", None) or registry.get_plugin_creator
    if lookup(*PLUGIN) is None:
        raise UserError(
            f"--plugin: no TensorRT plugin creator {PLUGIN[0]} v{PLUGIN[1]} is registered (mlpruning has "
            "no plugin library yet): drop --plugin to inline the block-sparse functions"
        )


def two_four_eligible(proto: Any) -> tuple[int, int]:
    """(weights that are 2:4 sparse along the reduction axis, MatMul/Gemm weights), for the report."""
    from onnx import numpy_helper

    weights = {init.name: init for init in proto.graph.initializer if len(init.dims) == 2}
    eligible = total = 0
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        w = w.T if trans_b else w  # [reduction, out]
        total += 1
        if w.shape[0] % 4 == 0:
            eligible += int((np.count_nonzero(w.reshape(-1, 4, w.shape[1]), axis=1) <= 2).all())
    return eligible, total


def prepare_onnx(path: Path, plugin: bool, int8: bool = False) -> tuple[Any, dict[str, Any]]:
    """The model TensorRT parses: functions inlined (default) or BlockSparseLinear as plugin calls."""
    import onnx

    proto = onnx.load(str(path))
    functions = len(proto.functions)
    if plugin:
        proto, nodes = plugin_form(proto)
        prep = {"block_sparse": "plugin", "plugin_nodes": nodes, "functions": functions}
    else:
        proto, prep = inline_functions(proto), {"block_sparse": "inlined", "functions": functions}
    check_int8(proto, path, int8)
    check_standard_ops(proto, path)
    return proto, prep


def check_standard_ops(proto: Any, path: Path) -> None:
    """One-line error for ops TensorRT's parser would send to a missing plugin (e.g. the
    com.microsoft fusions ``optimize --ort-fusion`` keeps), instead of its own parse error."""
    from graph_passes.block_sparse import TRT_DOMAIN

    allowed = ("", "ai.onnx", TRT_DOMAIN)
    foreign = sorted({f"{n.domain}.{n.op_type}" for n in proto.graph.node if n.domain not in allowed})
    if foreign:
        raise UserError(
            f"{path} has ops TensorRT cannot parse ({', '.join(foreign[:3])}): build from a model "
            "optimized without --ort-fusion"
        )


DYNAMIC_INT8_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def check_int8(proto: Any, path: Path, int8: bool) -> None:
    """One-line errors for what TensorRT's explicit quantization cannot take (module doc)."""
    from onnx import numpy_helper

    ops = {n.op_type for n in proto.graph.node}
    fix = f"mlpruning quantize {path.parent} --target tensorrt from its fp32 folder"
    if ops & DYNAMIC_INT8_OPS:
        found = ", ".join(sorted(ops & DYNAMIC_INT8_OPS))
        raise UserError(f"{path} is dynamically quantized ({found}), which TensorRT cannot build: {fix}")
    if not int8:
        if ops & QDQ_OPS:
            raise UserError(f"{path} is INT8 (QuantizeLinear/DequantizeLinear): pass --int8")
        return
    if "QuantizeLinear" not in ops:
        raise UserError(f"--int8 needs an explicitly quantized model (QDQ), {path} has none: {fix}")
    init = {t.name: t for t in proto.graph.initializer}
    points = [
        init[n.input[2]]
        for n in proto.graph.node
        if n.op_type in QDQ_OPS and len(n.input) > 2 and n.input[2] in init
    ]
    arrays = [numpy_helper.to_array(z) for z in points]
    # a QuantizeLinear without a zero point quantizes to uint8 (ONNX's default)
    unsigned = any(n.op_type == "QuantizeLinear" and len(n.input) < 3 for n in proto.graph.node)
    if unsigned or any(z.dtype != np.int8 or z.any() for z in arrays):
        found = "uint8, int32 or non-zero zero points"
        raise UserError(f"{path} has {found}; TensorRT takes symmetric int8: {fix}")


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = False
    sparsity: bool = False
    plugin: bool = False
    workspace_mib: int = 4096
    profile: Profile = Profile()
    tf32: bool = False  # TensorRT's default is on: 10-bit-mantissa matmuls miss fp32 parity
    int8: bool = False


def _fp16(trt: Any, config: Any, onnx_path: Path) -> Path:
    """Enable FP16: the builder flag (TensorRT 10) or an AutoCast fp16 graph (TensorRT >= 11)."""
    if hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
        return onnx_path
    try:
        import modelopt.onnx.autocast as autocast
        import onnx
    except ImportError:
        raise UserError(
            f"TensorRT {trt.__version__} has no FP16 builder flag (strongly typed only): pip install "
            "nvidia-modelopt[onnx] for the fp16 conversion, or pip install 'tensorrt-cu12<11'"
        ) from None
    converted = autocast.convert_to_mixed_precision(
        onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True
    )
    out = onnx_path.with_name("model_fp16.onnx")
    onnx.save(converted, str(out))
    return out


def _serialize(trt: Any, onnx_path: Path, shapes: dict, opts: BuildOptions) -> Any:
    logger = trt.Logger(trt.Logger.WARNING)
    if opts.plugin:
        require_plugin(trt, logger)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    config = builder.create_builder_config()
    if opts.fp16:
        onnx_path = _fp16(trt, config, onnx_path)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT cannot parse the model: {errors[0] if errors else 'no parser message'}")
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    if opts.sparsity:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if opts.int8 and hasattr(trt.BuilderFlag, "INT8"):  # TensorRT 10; 11 reads the Q/DQ pairs alone
        config.set_flag(trt.BuilderFlag.INT8)
    if not opts.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT could not build the engine: see its log above (try a larger --workspace)")
    return plan


def _write_plan(path: Path, plan: Any) -> None:
    """Atomically: a reader never sees half an engine under the final name."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(plan)  # IHostMemory exposes the buffer protocol

    write_with(path, write)


def build_engine(source: Path, out: Path, opts: BuildOptions) -> dict[str, Any]:
    """Build ``out/model.plan`` from ``source/model.onnx``; writes and returns the build report."""
    src = model_path(source)
    start = time.perf_counter()
    proto, prep = prepare_onnx(src, opts.plugin, opts.int8)  # refuses bad input before tensorrt
    trt = import_tensorrt()
    inputs, outputs = signature(proto)
    try:
        shapes = profile_shapes(inputs, opts.profile)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    eligible, weights = two_four_eligible(proto)
    if opts.sparsity and not eligible:
        log.warning(
            "--sparsity: none of the %d weights is 2:4 sparse, so TensorRT keeps dense kernels", weights
        )
    with tempfile.TemporaryDirectory(prefix="mlpruning-trt-") as tmp:
        import onnx

        prepared = Path(tmp) / ONNX_FILE
        onnx.save(proto, str(prepared))
        plan = _serialize(trt, prepared, shapes, opts)
    _write_plan(out / PLAN_FILE, plan)
    report = {
        "source": str(source),
        "plan": str(out / PLAN_FILE),
        "tensorrt": trt.__version__,
        "mlpruning": __version__,
        "fp16": opts.fp16,
        "int8": opts.int8,
        "sparsity": opts.sparsity,
        "tf32": opts.tf32,
        "two_four_weights": {"eligible": eligible, "total": weights},
        "workspace_mib": opts.workspace_mib,
        "profile": {"batch": list(opts.profile.batch), "seq": list(opts.profile.seq)},
        "shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
        "inputs": [i.name for i in inputs],
        "outputs": [o.name for o in outputs],
        **prep,
        "build_s": round(time.perf_counter() - start, 1),
    }
    write_json(out / ENGINE_REPORT, report)
    return report


class TensorName(NamedTuple):
    name: str


class TrtRunner:
    """A deserialized engine behind the ``get_inputs`` / ``run`` calls of an ORT session."""

    def __init__(self, plan: Path) -> None:
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise UserError("running model.plan needs a CUDA build of torch and a GPU: use --provider cpu")
        self._torch = torch
        # the logger and runtime must outlive the engine: keep references
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise UserError(
                f"{plan} does not load in TensorRT {trt.__version__}: engines are tied to the TensorRT "
                "version and GPU that built them, so rebuild it here with mlpruning build"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = self._engine.get_tensor_mode
        self._inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if mode(n) != trt.TensorIOMode.INPUT]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._stream = torch.cuda.Stream()

    def get_inputs(self) -> list[TensorName]:
        return [TensorName(n) for n in self._inputs]

    def get_outputs(self) -> list[TensorName]:
        return [TensorName(n) for n in self._outputs]

    def get_providers(self) -> list[str]:
        return [ENGINE_PROVIDER]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch, context, buffers = self._torch, self._context, {}
        with torch.cuda.stream(self._stream):
            for name in self._inputs:
                array = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
                if not context.set_input_shape(name, array.shape):
                    raise UserError(
                        f"input {name} of shape {array.shape} is outside the engine's profile: "
                        "rebuild with mlpruning build --batch/--seq covering it"
                    )
                buffers[name] = torch.from_numpy(array).to("cuda")
            for name in self._outputs:
                dtype = torch.from_numpy(np.empty(0, self._dtypes[name])).dtype
                buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            for name, tensor in buffers.items():
                context.set_tensor_address(name, tensor.data_ptr())
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            self._stream.synchronize()
        return [buffers[n].cpu().numpy() for n in (output_names or self._outputs)]
