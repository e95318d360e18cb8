"""Dense MatMul or BlockSparseLinear? A per-matrix decision from measurements on the target.

Whether skipping blocks pays depends on the machine, the shape, the token count, the block shape
and the density, and the break-even moves a lot (project CPU, ORT, 1 thread: 32x32 blocks break
even near 50% of blocks at 128 tokens but only near 30% for 3072x768 at 1024 tokens; 16x16 near
20-30%). So the model does not guess from FLOPs; it reads a calibration table measured on the
target (``benchmarks/block_sparse_micro.py`` writes it with ``measure``), or measures the actual
matrix in process (``decide_by_measuring``).

The table lists, per (in, out, tokens, block, density, balanced), the median over interleaved
rounds of dense_time / block_sparse_time ("speedup"). For a matrix to decide:

1. rows with the same block shape; a row-balanced mask may use balanced rows, a ragged one only
   random-mask rows (balanced masks are faster, so they would flatter a ragged mask);
2. the measured (in, out) nearest in log space (the exact shape when measured);
3. the measured token counts bracketing the request (the nearest one outside the range), keeping
   the smaller speedup;
4. density: speedup falls as density grows, so the speedup measured at the nearest density >= the
   requested one (within ``DENSITY_TOLERANCE``: masks keep whole blocks) is a lower bound
   ("bound"); the reported prediction interpolates log-speedup linearly between the two
   bracketing densities. Denser than every measurement: no bound.

Block-sparse is chosen only when the bound is >= ``min_speedup`` (default 1.1, above the noise of
a median of ratios on a busy machine). A configuration measured slower than dense therefore never
gets block-sparse, nor does anything denser than it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from graph_passes.ort_fusion import session

TABLE_VERSION = 1
DEFAULT_MIN_SPEEDUP = 1.1
DENSITY_TOLERANCE = 0.005  # a mask keeps whole blocks: 30% of 2304 blocks is 29.99%


@dataclass(frozen=True)
class Measurement:
    """One calibration row: BlockSparseLinear against dense MatMul on the same zeroed weight."""

    in_features: int
    out_features: int
    tokens: int
    block: tuple[int, int]
    density: float
    balanced: bool
    dense_ms: float
    sparse_ms: float
    speedup: float  # median over rounds of dense / sparse (thread CPU time, see measure_mask)
    wall_speedup: float | None = None
    rounds: int | None = None

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Measurement:
        return cls(**{**row, "block": tuple(row["block"])})


@dataclass(frozen=True)
class Decision:
    block_sparse: bool
    reason: str
    speedup: float | None = None  # predicted (interpolated in density)
    bound: float | None = None  # conservative speedup the decision rests on

    @property
    def choice(self) -> str:
        return "block_sparse" if self.block_sparse else "dense"


def load_table(path: Path) -> list[Measurement]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("version") != TABLE_VERSION:
        raise ValueError(
            f"{path}: calibration table version {data.get('version')}, expected {TABLE_VERSION}:"
            " re-run benchmarks/block_sparse_micro.py on the target"
        )
    return [Measurement.from_json(row) for row in data["rows"]]


def table_json(rows: list[Measurement], meta: dict[str, Any]) -> dict[str, Any]:
    return {"version": TABLE_VERSION, **meta, "rows": [asdict(r) | {"block": list(r.block)} for r in rows]}


def _nearest_shape(shapes: set[tuple[int, int]], target: tuple[int, int]) -> tuple[int, int]:
    def distance(shape: tuple[int, int]) -> float:
        return sum(abs(math.log(v / t)) for v, t in zip(shape, target, strict=True))

    return min(sorted(shapes), key=distance)


def _bracket(measured: list[int], tokens: int) -> list[int]:
    below = [t for t in measured if t <= tokens]
    above = [t for t in measured if t >= tokens]
    picked = {max(below)} if below else set()
    picked |= {min(above)} if above else set()
    return sorted(picked)


def _along_density(rows: list[Measurement], density: float) -> tuple[Measurement | None, float | None]:
    """(bounding row, interpolated prediction) from rows of one shape and token count.

    The bounding row is the sparsest measurement at least as dense as requested.
    """
    rows = sorted(rows, key=lambda r: r.density)
    above = [r for r in rows if r.density >= density - DENSITY_TOLERANCE]
    if not above:
        return None, None
    hi = above[0]
    below = [r for r in rows if r.density < hi.density]
    if not below or hi.density <= density:  # sparser than all rows: no extrapolation
        return hi, hi.speedup
    lo = below[-1]
    t = (density - lo.density) / (hi.density - lo.density)
    return hi, math.exp((1 - t) * math.log(lo.speedup) + t * math.log(hi.speedup))


def _setting(block: tuple[int, int], density: float, tokens: int) -> str:
    return f"{density:.0%} blocks, {block[0]}x{block[1]}, {tokens} tokens"


def decide(
    table: list[Measurement],
    *,
    in_features: int,
    out_features: int,
    tokens: int,
    block: tuple[int, int],
    density: float,
    balanced: bool = False,
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
) -> Decision:
    """Dense or block-sparse for one matrix, with a reason a human can read."""
    setting = _setting(block, density, tokens)
    rows = [r for r in table if r.block == tuple(block) and (balanced or not r.balanced)]
    if not rows:
        return Decision(False, f"dense: no calibration for {block[0]}x{block[1]} blocks ({setting})")
    shape = _nearest_shape({(r.in_features, r.out_features) for r in rows}, (in_features, out_features))
    rows = [r for r in rows if (r.in_features, r.out_features) == shape]
    on = f"{shape[0]}x{shape[1]}" + ("" if shape == (in_features, out_features) else " (nearest measured)")
    bounds, predictions = [], []
    for t in _bracket(sorted({r.tokens for r in rows}), tokens):
        row, predicted = _along_density([r for r in rows if r.tokens == t], density)
        if row is None:
            densest = max(r.density for r in rows if r.tokens == t)
            return Decision(False, f"dense: {setting} is denser than any calibration ({densest:.0%}) on {on}")
        bounds.append(row)
        predictions.append(predicted)
    row, predicted = min(bounds, key=lambda r: r.speedup), min(predictions)
    measured = f"{row.speedup:.2f}x at {row.density:.0%} blocks, {row.tokens} tokens on {on}"
    if row.speedup >= min_speedup:
        reason = (
            f"block-sparse: predicted {predicted:.1f}x faster than dense at {setting} (measured {measured})"
        )
        return Decision(True, reason, predicted, row.speedup)
    reason = f"dense: block-sparse measured {measured}, needs >= {min_speedup:.2f}x ({setting})"
    return Decision(False, reason, predicted, row.speedup)


def random_block_mask(
    blocks: tuple[int, int], density: float, *, balanced: bool = False, seed: int = 0
) -> np.ndarray:
    """A [in_blocks, out_blocks] mask keeping round(density * size) blocks.

    Random: the kept blocks are uniform over the matrix (block-rows get ragged counts).
    Balanced: every block-row (output block) keeps round(density * in_blocks) blocks.
    """
    rng = np.random.default_rng(seed)
    n_in, n_out = blocks
    mask = np.zeros(blocks, dtype=bool)
    if balanced:
        k = round(density * n_in)
        for j in range(n_out):
            mask[rng.choice(n_in, size=k, replace=False), j] = True
    else:
        mask.flat[rng.choice(mask.size, size=round(density * mask.size), replace=False)] = True
    return mask


def _linear_model(wt: np.ndarray, bias: np.ndarray) -> tuple[Any, Any]:
    """An onnx_ir model X [1, tokens, in] -> X @ wt + bias, and its LinearSite."""
    import onnx_ir as ir

    from graph_passes.linears import LinearSite

    dtype = ir.TensorType(ir.DataType.from_numpy(wt.dtype))
    x = ir.Value(name="X", shape=ir.Shape([1, "tokens", wt.shape[0]]), type=dtype)
    w = ir.Value(name="W", shape=ir.Shape(wt.shape), type=dtype, const_value=ir.tensor(wt, name="W"))
    b = ir.Value(name="B", shape=ir.Shape(bias.shape), type=dtype, const_value=ir.tensor(bias, name="B"))
    matmul = ir.Node("", "MatMul", [x, w], name="linear/MatMul")
    add = ir.Node("", "Add", [matmul.outputs[0], b], name="linear/Add")
    add.outputs[0].name = "Y"
    graph = ir.Graph([x], add.outputs, nodes=[matmul, add], initializers=[w, b], opset_imports={"": 17})
    return ir.Model(graph, ir_version=10), LinearSite(0, "linear", matmul, w, 1, add, b, 1)


def _models(wt: np.ndarray, mask: np.ndarray, block: tuple[int, int]) -> tuple[bytes, bytes]:
    """(dense, block-sparse) models of one linear with bias, the pruned blocks zeroed.

    With a bias, as every linear of an exported BERT has: the node's output then comes from the
    bias Add, never from a Reshape that ORT would have to copy into a graph output.
    """
    import onnx_ir as ir

    from graph_passes.block_sparse import replace_linear

    masked = wt * np.kron(mask, np.ones(block, dtype=wt.dtype))
    bias = np.random.default_rng(2).standard_normal(wt.shape[1]).astype(wt.dtype)
    protos = []
    for sparse in (False, True):
        model, site = _linear_model(masked, bias)
        if sparse:
            replace_linear(model, site, mask, block)
        protos.append(ir.serde.serialize_model(model).SerializeToString())
    return protos[0], protos[1]


def _run_timed(session: Any, feed: dict[str, np.ndarray]) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one run."""
    cpu, wall = time.thread_time(), time.perf_counter()
    session.run(None, feed)
    return time.thread_time() - cpu, time.perf_counter() - wall


@dataclass(frozen=True)
class Timing:
    dense_ms: float
    sparse_ms: float
    speedup: float  # median over rounds of dense / sparse, thread CPU time
    wall_speedup: float  # the same with wall-clock time
    rounds: int


def measure_mask(
    wt: np.ndarray,
    mask: np.ndarray,
    block: tuple[int, int],
    tokens: int,
    *,
    budget_s: float = 1.0,
    min_rounds: int = 15,
    threads: int = 1,
) -> Timing:
    """Dense vs block-sparse on this weight and mask, in interleaved rounds in one process.

    A round runs each model once, the order alternating between rounds, so both see the same
    machine state and each starts with caches the other one polluted, as a linear does between
    other layers in a real model (repeating one model keeps its weights cache-resident, which
    flatters the smaller block-sparse weights). The speedup is the median of per-round ratios.
    Times are the calling thread's CPU time: with one intra-op thread ORT runs every kernel on the
    calling thread, and CPU time leaves out the slices the scheduler gives to other processes on
    a busy machine; the wall-clock ratio is kept next to it.
    """
    dense, sparse = (session(m, threads) for m in _models(wt, mask, block))
    feed = {"X": np.random.default_rng(1).standard_normal((1, tokens, wt.shape[0])).astype(wt.dtype)}
    for _ in range(3):  # warm-up: allocations, first-run caches
        probe = [_run_timed(s, feed)[1] for s in (dense, sparse)]
    rounds = max(min_rounds, int(budget_s / max(sum(probe), 1e-6)))
    times = np.zeros((rounds, 2, 2))  # round, (dense, sparse), (cpu, wall)
    for k in range(rounds):
        order = (0, 1) if k % 2 == 0 else (1, 0)
        for which in order:
            times[k, which] = _run_timed((dense, sparse)[which], feed)
    ratios = np.median(times[:, 0] / times[:, 1], axis=0)
    dense_ms, sparse_ms = np.median(times[:, :, 0], axis=0) * 1e3
    return Timing(float(dense_ms), float(sparse_ms), float(ratios[0]), float(ratios[1]), rounds)


def _row(
    wt: np.ndarray, mask: np.ndarray, block: tuple[int, int], tokens: int, timing: Timing
) -> Measurement:
    balanced = bool(np.all(mask.sum(axis=0) == mask.sum(axis=0)[0]))
    return Measurement(
        wt.shape[0],
        wt.shape[1],
        tokens,
        (block[0], block[1]),
        float(mask.mean()),
        balanced,
        timing.dense_ms,
        timing.sparse_ms,
        timing.speedup,
        timing.wall_speedup,
        timing.rounds,
    )


def measure(
    in_features: int,
    out_features: int,
    tokens: int,
    block: tuple[int, int],
    density: float,
    *,
    balanced: bool = False,
    budget_s: float = 1.0,
    seed: int = 0,
) -> Measurement:
    """One calibration row on a random weight and a random block mask of that density."""
    blocks = (in_features // block[0], out_features // block[1])
    mask = random_block_mask(blocks, density, balanced=balanced, seed=seed)
    wt = np.random.default_rng(seed).standard_normal((in_features, out_features)).astype(np.float32)
    row = _row(wt, mask, block, tokens, measure_mask(wt, mask, block, tokens, budget_s=budget_s))
    return replace(row, balanced=balanced)  # a random mask can be balanced by chance; keep its kind


def decide_by_measuring(
    wt: np.ndarray,
    mask: np.ndarray,
    block: tuple[int, int],
    tokens: int,
    *,
    budget_s: float = 0.5,
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
) -> Decision:
    """Measure this very weight and mask in process and decide from that single measurement."""
    row = _row(wt, mask, block, tokens, measure_mask(wt, mask, block, tokens, budget_s=budget_s))
    return decide(
        [row],
        in_features=row.in_features,
        out_features=row.out_features,
        tokens=tokens,
        block=block,
        density=row.density,
        balanced=row.balanced,
        min_speedup=min_speedup,
    )
