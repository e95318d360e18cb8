"""Measured cost of scattering output rows: dense MatMul vs kept-rows MatMul + Gather.

For one weight shape [in, n] with k kept output rows, two one-node-pair ONNX models are timed
with ONNX Runtime on this machine (CPU, 1 intra-op thread, ``tokens`` rows of input): the dense
``x @ W`` and the scattered ``Gather(x @ W_k, map)``. Rounds alternate between the two so drift
hits both alike; the decision uses the median of per-round time ratios and scatters only when
it is faster by at least ``margin`` (default 10%), because a near tie is not worth a changed
graph. Results are cached per shape, so a model with many identical layers is timed once.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from graph_passes.ort_fusion import session


@dataclass(frozen=True)
class Decision:
    scatter: bool
    ratio: float  # dense time / scatter time (> 1: scatter is faster)
    reason: str


def _model(n_in: int, n_out: int, index: np.ndarray | None) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", n_in])
    width = n_out if index is None else len(index)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", width])
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((n_in, n_out), dtype=np.float32)
    inits = [onnx.numpy_helper.from_array(weight, "w")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if index is None else "z"])]
    if index is not None:
        inits.append(onnx.numpy_helper.from_array(index, "map"))
        nodes.append(helper.make_node("Gather", ["z", "map"], ["y"], axis=-1))
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def _time(session, feed: dict[str, np.ndarray], iters: int) -> float:  # noqa: ANN001
    start = time.perf_counter()
    for _ in range(iters):
        session.run(None, feed)
    return (time.perf_counter() - start) / iters


@dataclass
class ScatterCost:
    """Per-shape timing of dense vs scattered output rows, cached."""

    tokens: int = 128
    rounds: int = 5
    iters: int = 10
    margin: float = 0.10
    _cache: dict[tuple[int, int, int], Decision] = field(default_factory=dict)

    def decide(self, n_in: int, n_out: int, kept: int) -> Decision:
        key = (n_in, n_out, kept)
        if key not in self._cache:
            self._cache[key] = self._measure(n_in, n_out, kept)
        return self._cache[key]

    def _measure(self, n_in: int, n_out: int, kept: int) -> Decision:
        index = np.full(n_out, kept, dtype=np.int64)
        index[:kept] = np.arange(kept)
        dense, scatter = session(_model(n_in, n_out, None)), session(_model(n_in, kept + 1, index))
        feed = {"x": np.random.default_rng(1).standard_normal((self.tokens, n_in), dtype=np.float32)}
        for s in (dense, scatter):
            _time(s, feed, 3)  # warm-up
        ratios = [
            _time(dense, feed, self.iters) / _time(scatter, feed, self.iters) for _ in range(self.rounds)
        ]
        ratio = statistics.median(ratios)
        verdict = ratio >= 1 + self.margin
        what = "scattered" if verdict else "left dense"
        reason = (
            f"{kept}/{n_out} rows kept, {what}: scatter measured {ratio:.2f}x vs dense "
            f"({self.tokens} tokens, 1 thread; needs >= {1 + self.margin:.2f}x)"
        )
        return Decision(verdict, ratio, reason)
