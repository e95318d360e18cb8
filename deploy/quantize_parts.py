"""The pieces :mod:`deploy.quantize` is made of: options, candidates, the source check, the
calibration data, the groups of MatMuls accuracy control keeps fp32, and one quantizer call.

Groups: every MatMul or Gemm with a constant weight by the encoder layer its module belongs to
(``layer.3``, read from the exporter's name scopes, :mod:`graph_passes.scopes`, and the
manifest's module paths), ``head`` for the task head (pooler, classifier) and ``other`` for
nodes no module claims; ``embeddings`` for the Gathers from constant tables (word, position
and token-type embeddings), which a dynamic candidate with ``int8_embeddings`` stores in 8 bits
and dequantizes after the lookup: no time saved, but MiniLM's 30,522 x 384 word table is 47 MB
of its 91 MB file in fp32 (static mode keeps them fp32: a QDQ Gather would also quantize its
output, the activation every layer adds to); ``activation_products`` for attention's
activation x activation MatMuls (Q K^T, P V), which stay fp32 in both modes (the QDQ quantizer
does not honour ``MatMulConstBOnly``, so static mode names them in ``nodes_to_exclude``).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graph_passes.block_sparse import DOMAIN as BLOCK_SPARSE_DOMAIN
from graph_passes.scopes import module_path
from mlpruning.core.contract import (
    CONFIG_FILE,
    EXPORT_REPORT,
    MANIFEST_FILE,
    ONNX_FILE,
    OPTIMIZE_REPORT,
    QUANTIZE_REPORT,
    TOKENIZER_FILES,
)
from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json, recorded_task
from mlpruning.core.manifest import read_manifest
from mlpruning.core.tolerance import INT8_MAX_METRIC_DROP, INT8_MIN_AGREEMENT
from pipeline.tasks import Examples, TaskSpec, get_task

MODES = ("auto", "dynamic", "static")
SEARCHES = ("quick", "full")
TARGETS = ("cpu", "tensorrt")
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # ORT's names
QUANT_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul"}
QUANTIZED_OPS = ("MatMul", "Gemm")  # the linears; LayerNorm, softmax and GELU stay fp32
EMBEDDING_OPS = ("Gather",)  # lookups in constant tables: dynamic mode only (module doc)
CARRIED = (CONFIG_FILE, MANIFEST_FILE, EXPORT_REPORT, OPTIMIZE_REPORT, *TOKENIZER_FILES)


@dataclass(frozen=True)
class QuantizeOptions:
    """``mode``: auto (measure both), dynamic or static. ``search``: quick (per-channel on and
    off, no reduce-range) or full (adds reduce-range and per-tensor static). The bounds are
    against the fp32 input: ``max_metric_drop`` in the metric's units (0.01 is one point).
    ``target``: ``cpu`` (ONNX Runtime; the fastest passing candidate here) or ``tensorrt``:
    static QDQ with signed symmetric int8 activations and weights (zero points 0, what
    TensorRT's explicit quantization takes), the most accurate passing candidate, since timing
    on this CPU says nothing about the GPU."""

    mode: str = "auto"
    search: str = "quick"
    calibration_examples: int = 256
    calibrate_method: str = "minmax"
    max_metric_drop: float = INT8_MAX_METRIC_DROP
    min_agreement: float = INT8_MIN_AGREEMENT
    seed: int = 0
    threads: int = 1
    task: str | None = None
    target: str = "cpu"

    def __post_init__(self) -> None:
        choices = (("mode", MODES), ("search", SEARCHES), ("calibrate_method", CALIBRATION_METHODS))
        choices += (("target", TARGETS),)
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 1 <= self.calibration_examples <= 100_000:
            raise ValueError(f"calibration_examples must be in [1, 100000], got {self.calibration_examples}")
        if not 0 <= self.max_metric_drop <= 1 or not 0 <= self.min_agreement <= 1:
            raise ValueError("max_metric_drop and min_agreement must be in [0, 1], e.g. 0.01 and 0.99")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.target == "tensorrt" and self.mode == "dynamic":
            raise ValueError(
                "target tensorrt takes static QDQ only (no dynamic ops): use mode auto or static"
            )

    def candidates(self) -> list[Candidate]:
        full = self.search == "full"
        if self.target == "tensorrt":
            return [Candidate("static", pc, symmetric=True) for pc in ((True, False) if full else (True,))]
        found = []
        if self.mode in ("auto", "dynamic"):
            ranges = (False, True) if full else (False,)
            found += [Candidate("dynamic", pc, rr) for pc in (False, True) for rr in ranges]
        if self.mode in ("auto", "static"):
            found += [Candidate("static", pc) for pc in ((True, False) if full else (True,))]
        return found


@dataclass(frozen=True)
class Candidate:
    mode: str
    per_channel: bool
    reduce_range: bool = False
    keep_fp32: tuple[str, ...] = ()  # groups (layer_groups) left unquantized
    symmetric: bool = False  # static: int8 activations with zero point 0 (TensorRT), else uint8
    int8_embeddings: bool = False  # dynamic: the embedding tables stored in 8 bits too

    def keeping(self, groups: tuple[str, ...]) -> Candidate:
        return replace(self, keep_fp32=groups)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "keep_fp32": list(self.keep_fp32)}


def check_source(src: Path, task_name: str | None) -> TaskSpec:
    """The task of an fp32 folder fit to quantize, or a one-line UserError naming the fix."""
    if not (src / ONNX_FILE).is_file():
        raise UserError(f"{src} has no {ONNX_FILE}: pass a folder written by export or optimize")
    ops = {node.op_type for node in ir.load(src / ONNX_FILE).graph.all_nodes()}
    if (src / QUANTIZE_REPORT).is_file() or ops & QUANT_OPS:
        raise UserError(f"{src} is already quantized: pass the fp32 folder it was made from")
    manifest = read_manifest(src / MANIFEST_FILE, "export") if (src / MANIFEST_FILE).is_file() else {}
    if manifest.get("kind") == "masked" and not (src / OPTIMIZE_REPORT).is_file():
        raise UserError(
            f"{src} is a pruned export whose zeros are still in place: run mlpruning optimize on it "
            "and quantize the optimized folder"
        )
    own = recorded_task(src)
    if own is None:
        raise UserError(f"{src} does not say its task (export.json): re-run export")
    if task_name is not None and get_task(task_name).name != get_task(own).name:
        raise UserError(f"{src} was trained for {own}, not {task_name}: pass --task {own} or drop --task")
    return get_task(own)


def layer_groups(path: Path) -> dict[str, list[str]]:
    """MatMul, Gemm and embedding Gather node names by group (module doc), and the
    BlockSparseLinear nodes (``block_sparse``). A task head is often a Gemm (the pooler and the
    classifier)."""
    manifest = read_json(path.parent / MANIFEST_FILE) or {}
    layers = re.escape(((manifest.get("adapter") or {}).get("layers")) or "layer")
    pattern = re.compile(rf"(?:^|\.){layers}\.(\d+)(?:\.|$)")
    groups: dict[str, list[str]] = {
        "head": [],
        "other": [],
        "embeddings": [],
        "block_sparse": [],
        "activation_products": [],
    }
    graph = ir.load(path).graph
    constants = {v.name for v in graph.initializers.values()}
    constants |= {n.outputs[0].name for n in graph if n.op_type == "Constant"}
    for node in graph:
        if node.domain == BLOCK_SPARSE_DOMAIN:
            groups["block_sparse"].append(node.name or "")
        if node.op_type in EMBEDDING_OPS and node.name and node.inputs[0] is not None:
            if node.inputs[0].name in constants:  # not the Gathers of shape arithmetic
                groups["embeddings"].append(node.name)
            continue
        if node.op_type not in QUANTIZED_OPS or not node.name:
            continue
        if not any(i is not None and i.name in constants for i in node.inputs):
            groups["activation_products"].append(node.name)  # attention's Q K^T and P V
            continue
        scope = module_path(node)
        match = pattern.search(scope) if scope else None
        key = f"layer.{int(match[1])}" if match else ("head" if scope else "other")
        groups.setdefault(key, []).append(node.name)
    return groups


class _Feeds:
    """ONNX Runtime's calibration reader protocol over prepared feeds (one example each)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds, self.at = feeds, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.at += 1
        return self.feeds[self.at - 1] if self.at <= len(self.feeds) else None

    def rewind(self) -> None:
        self.at = 0


def calibration_reader(model: Any, train: Examples, n: int, seed: int) -> Callable[[], _Feeds]:
    """A fresh reader over ``n`` training examples (seeded choice) for each static candidate."""
    if len(train) == 0:
        raise UserError(f"{train.source} has no examples: pass a non-empty training split")
    picked = np.sort(np.random.default_rng(seed).permutation(len(train))[: min(n, len(train))])
    items = [train.texts[i][0] if len(train.texts[i]) == 1 else tuple(train.texts[i][:2]) for i in picked]
    feeds = [model.feeds([enc]) for enc in model.encode(items)]
    return lambda: _Feeds(feeds)


def _common_options(candidate: Candidate, groups: dict[str, list[str]]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType

    excluded = [n for g in candidate.keep_fp32 for n in groups.get(g, [])]
    return {
        "op_types_to_quantize": [*QUANTIZED_OPS, *(EMBEDDING_OPS if candidate.int8_embeddings else ())],
        "per_channel": candidate.per_channel,
        "reduce_range": candidate.reduce_range,
        "weight_type": QuantType.QInt8,
        # the dynamic quantizer first splits a Gemm G into G_MatMul + G_Add and quantizes those
        "nodes_to_exclude": excluded + [f"{n}_MatMul" for n in excluded],
    }


def copy_carried(src: Path, out: Path) -> None:
    """The fp32 folder's files an INT8 copy keeps beside its ``model.onnx`` (config, manifest,
    reports, tokenizer): what serve, verify and export-triton read."""
    for name in CARRIED:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)


def write_candidate(
    src: Path,
    out: Path,
    candidate: Candidate,
    groups: dict[str, list[str]],
    calibration: Callable[[], _Feeds] | None,
    method: str = "minmax",
) -> None:
    """``candidate`` of ``src/model.onnx`` into ``out``, with the folder's other files."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out.mkdir(parents=True)
    copy_carried(src, out)
    common = _common_options(candidate, groups)
    if candidate.mode == "dynamic":
        with _quiet():  # attention's activation x activation products stay fp32
            quantize_dynamic(
                src / ONNX_FILE, out / ONNX_FILE, **common, extra_options={"MatMulConstBOnly": True}
            )
        return
    if calibration is None:
        raise ValueError("a static candidate needs calibration data")
    common["nodes_to_exclude"] += groups.get("activation_products", [])
    with _quiet():
        quantize_static(
            src / ONNX_FILE,
            out / ONNX_FILE,
            calibration(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8 if candidate.symmetric else QuantType.QUInt8,
            calibrate_method=CalibrationMethod[CALIBRATION_METHODS[method]],
            # linear outputs stay fp32, so ORT runs MatMulIntegerToFloat: no requantization
            # before the bias, GELU and residual adds
            extra_options={
                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
                "ActivationSymmetric": candidate.symmetric,
                "WeightSymmetric": True,
                # an int32 bias DequantizeLinear is not TensorRT's form: biases stay fp32 there
                "QuantizeBias": not candidate.symmetric,
            },
            **common,
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizers log a pre-processing hint on the root logger for every call: not the
    user's concern here (shape inference runs inside the quantizer anyway)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
