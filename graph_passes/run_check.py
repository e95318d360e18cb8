"""Run a rewritten model in ONNX Runtime and compare it with the model it came from.

``onnx.checker`` with full shape inference accepts graphs that no runtime can execute: a
heads-merge Reshape that still asks for the unpruned all-head size passes inference (the
target shape is data) and only fails when ONNX Runtime sizes the next MatMul. So optimize runs
every rewritten model, and the file it writes, before anything is renamed into place.

The inputs are the encoder's usual ones, built from what the session declares: token ids drawn
uniformly from the vocabulary (the word-embedding table's row count), an attention mask with the
last sequence of each batch right-padded from a third of its length, zero token types, and
positions 0..S-1. Shapes are mixed (batch x sequence = 1x7, 2x16, 3x33), clipped to fixed axes
and to the position table when the graph states them. Every output is compared element-wise
with the polygraphy rule that verify uses: an element fails only where its absolute difference
exceeds both ``atol`` and ``rtol`` times the reference (a NaN or inf fails).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graph_passes.ort_fusion import session
from mlpruning.core.errors import CheckFailed, UserError, first_line
from mlpruning.core.hf_config import position_limit
from mlpruning.core.tolerance import beyond_tolerance

SHAPES = ((1, 7), (2, 16), (3, 33))
ATOL, RTOL = 1e-4, 1e-3  # verify's defaults
_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class RunCheckFailed(CheckFailed):
    """A rewritten model does not load or run, or differs from its input; the message says which."""


@dataclass(frozen=True)
class Limits:
    """What the random inputs may hold: token ids below ``vocab``, at most ``positions`` tokens."""

    vocab: int
    positions: int | None = None


def _session(model: Path | bytes) -> Any:
    return session(model if isinstance(model, bytes) else Path(model), quiet=True)


def _ort_reason(exc: BaseException) -> str:
    """ORT's message without its error-code prefix and source locations, on one line."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(exc))
    return re.sub(r"\S*onnxruntime_src/\S+ (\S+::\S+\(.*?\) )?", "", text)


def _input(info: Any, batch: int, seq: int, limits: Limits, rng: np.random.Generator) -> np.ndarray:
    """One feed for input ``info`` (an ORT NodeArg) at (batch, seq)."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in info.shape]
    batch = dims[0] or batch if dims else batch
    seq = dims[1] or seq if len(dims) > 1 else seq
    dtype = _INT_TYPES.get(info.type)
    if dtype is None:  # a float input (inputs_embeds, say): standard normal values
        return rng.standard_normal([d or s for d, s in zip(dims, (batch, seq, 1), strict=False)]).astype(
            np.float32
        )
    name = info.name.lower()
    if "mask" in name:
        mask = np.ones((batch, seq), dtype)
        mask[-1, max(1, seq // 3) :] = 0
        return mask
    if "position" in name:
        return np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
    if "type" in name:
        return np.zeros((batch, seq), dtype)
    return rng.integers(0, limits.vocab, (batch, seq)).astype(dtype)


def feeds(session: Any, limits: Limits, shapes: tuple[tuple[int, int], ...] = SHAPES) -> list[dict]:
    """One feed dict per (batch, sequence) shape, the same for every model of one check."""
    rng = np.random.default_rng(0)
    out = []
    for batch, seq in shapes:
        seq = min(seq, limits.positions) if limits.positions else seq
        out.append({i.name: _input(i, batch, seq, limits, rng) for i in session.get_inputs()})
    return out


def compare(want: np.ndarray, got: np.ndarray, atol: float = ATOL, rtol: float = RTOL) -> tuple[float, int]:
    """(max absolute difference, failing elements) under the polygraphy rule."""
    if want.shape != got.shape:
        raise RunCheckFailed(f"output shape {list(got.shape)}, the input model gives {list(want.shape)}")
    if want.dtype.kind not in "fc":
        wrong = int((want != got).sum())
        return (float(wrong > 0), wrong)
    diff, failing = beyond_tolerance(got, want, atol, rtol)
    return float(diff.max()) if diff.size else 0.0, int(failing.sum())


@dataclass
class Reference:
    """The input model's outputs on fixed random feeds, to hold every rewrite against."""

    output_names: list[str]
    feeds: list[dict[str, np.ndarray]]
    outputs: list[list[np.ndarray]]
    atol: float = ATOL
    rtol: float = RTOL

    @classmethod
    def of(cls, model: Path | bytes, limits: Limits) -> Reference:
        try:
            sess = _session(model)
            batches = feeds(sess, limits)
            outputs = [sess.run(None, f) for f in batches]
        except Exception as exc:  # ORT raises its own exception types for unrunnable models
            why = _ort_reason(exc)
            raise UserError(
                f"the input model does not run in ONNX Runtime ({why}): pass a model that runs, as exported"
            ) from None
        return cls([o.name for o in sess.get_outputs()], batches, outputs)

    def check(self, model: Path | bytes) -> dict[str, Any]:
        """Max abs difference per output; RunCheckFailed when ``model`` fails to load, run or match."""
        try:
            sess = _session(model)
            got = [sess.run(self.output_names, f) for f in self.feeds]
        except Exception as exc:
            raise RunCheckFailed(f"ONNX Runtime cannot run it ({_ort_reason(exc)})") from None
        worst: dict[str, float] = dict.fromkeys(self.output_names, 0.0)
        for want_batch, got_batch, feed in zip(self.outputs, got, self.feeds, strict=True):
            for name, want, have in zip(self.output_names, want_batch, got_batch, strict=True):
                diff, failing = compare(want, have, self.atol, self.rtol)
                worst[name] = max(worst[name], diff)
                if failing:
                    shape = list(next(iter(feed.values())).shape)
                    raise RunCheckFailed(
                        f"output '{name}' differs from the input model on a {shape} batch: "
                        f"{failing} elements beyond atol {self.atol:g} / rtol {self.rtol:g}, "
                        f"max abs diff {diff:.2e}"
                    )
        return {"shapes": [list(next(iter(f.values())).shape) for f in self.feeds], "max_abs_diff": worst}


def limits_of(model: Any, config: dict[str, Any] | None) -> Limits:
    """Vocabulary from the word-embedding Gather of ``model`` (an onnx_ir Model), positions from config.

    The word embedding is the Gather whose indices are a graph input (through Cast or Identity)
    and whose table is a constant; without one, ``vocab_size`` from the config, else 2.
    """
    inputs = {id(v) for v in model.graph.inputs}
    vocab = None
    for node in model.graph:
        if node.op_type != "Gather" or len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        index = node.inputs[1]
        producer = index.producer() if index is not None else None
        if producer is not None and producer.op_type in ("Cast", "Identity"):
            index = producer.inputs[0]
        table = node.inputs[0]
        if id(index) in inputs and table.const_value is not None and len(table.shape) == 2:
            vocab = int(table.shape[0])
            break
    config = config or {}
    return Limits(vocab or int(config.get("vocab_size") or 2), position_limit(config))
