"""Optional ONNX Runtime transformer fusions, kept only when they measure faster here.

``onnxruntime.transformers.optimizer`` fuses attention subgraphs, GELU and layer norms into
ORT contrib ops. Two rules make that safe on pruned models:

- it is called with ``num_heads=0, hidden_size=0`` so the attention fusion reads the head count
  of every layer from the graph (the strip-heads pass writes it explicitly into each Q/K/V
  Reshape); a global head count would be silently wrong for layers that lost heads;
- SkipLayerNormalization fusion stays off: its fp32 CPU kernel measured far slower than plain
  LayerNormalization on this project's CPU, and session creation is told not to re-fuse it
  (``DISABLED_AT_LOAD``, used by verify and bench too).

The fused model must reproduce the unfused one (max abs diff <= 1e-4 on random token ids with
padding) and be faster by ``margin`` in interleaved timing (1 thread, batch 1, 128 tokens);
otherwise the unfused model is kept. The report records the fused-op counts, both timings and
the decision.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

DISABLED_AT_LOAD = ["SkipLayerNormFusion"]


def session(model: onnx.ModelProto | Path | bytes, threads: int = 1, quiet: bool = False) -> Any:
    """A CPU session with ``threads`` intra-op threads and SkipLayerNorm fusion disabled at load.

    ``quiet``: ORT logs nothing below fatal (a caller that turns failures into its own message).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if quiet:
        opts.log_severity_level = 4
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    else:
        source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(
        source, opts, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_AT_LOAD
    )


def _feed(sess: Any, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for inp in sess.get_inputs():
        if inp.name == "attention_mask":
            mask = np.ones((batch, seq), np.int64)
            mask[-1, seq // 2 :] = 0
            feed[inp.name] = mask
        elif inp.name == "input_ids":
            feed[inp.name] = rng.integers(1000, 9000, (batch, seq), dtype=np.int64)
        else:
            feed[inp.name] = np.zeros((batch, seq), np.int64)
    return feed


def _median_ratio(plain: Any, fused: Any, feed: dict[str, np.ndarray], rounds: int, iters: int) -> float:
    def clock(sess: Any) -> float:
        start = time.perf_counter()
        for _ in range(iters):
            sess.run(None, feed)
        return time.perf_counter() - start

    for sess in (plain, fused):
        clock(sess)  # warm-up
    return statistics.median(clock(plain) / clock(fused) for _ in range(rounds))


def fuse_if_faster(
    model: onnx.ModelProto, margin: float = 0.05, rounds: int = 5, iters: int = 10
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The fused model when it is exact and faster, else ``model``; plus the report."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    # optimize_model fuses the proto it is given in place: hand it a copy, keep ``model`` unfused
    fused = optimize_model(
        onnx.ModelProto.FromString(model.SerializeToString()),
        model_type="bert",
        num_heads=0,
        hidden_size=0,
        optimization_options=options,
        opt_level=0,
    )
    counts = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    plain_s, fused_s = session(model), session(fused.model)
    feed = _feed(plain_s, 2, 37)
    diff = float(np.abs(plain_s.run(None, feed)[0] - fused_s.run(None, feed)[0]).max())
    ratio = _median_ratio(plain_s, fused_s, _feed(plain_s, 1, 128), rounds, iters)
    keep = diff <= 1e-4 and ratio >= 1 + margin
    report = {
        "name": "ort_fusion",
        "fused_ops": counts,
        "max_abs_diff": diff,
        "speedup_median": round(ratio, 3),
        "kept": keep,
        "reason": (
            f"fused graph {ratio:.2f}x vs unfused (batch 1, 128 tokens, 1 thread; needs >= "
            f"{1 + margin:.2f}x), max abs diff {diff:.1e}"
        ),
    }
    return (fused.model if keep else model), report
