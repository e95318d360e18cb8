"""Latency of a model folder, optionally against a baseline, as ratios in one run.

The model runs in ONNX Runtime with ``provider`` (cpu, or cuda / tensorrt with onnxruntime-gpu)
or, with ``engine`` or a folder holding only model.plan, as a TensorRT engine; the baseline
folder is opened the same way (``engine`` applies to the model only). GPU timings include the
host-device copies of inputs and outputs, as a caller of ``session.run`` would see them.

For every (batch, sequence) point both sessions are warmed up, then timed in interleaved rounds:
each round runs the model ``iters`` times, then the baseline ``iters`` times. Interleaving puts
both under the same machine load, so the per-round ratio baseline/model is stable on a shared
machine even when absolute times drift; the reported speedup is the median of those ratios.
Per model: p50/p90/p99 of single-run latencies and throughput (sequences per second at p50).

Inputs are random token ids with a full attention mask (every position real), so latency does
not depend on the data. The report records versions, threads, the CPU and the provider each side
ran on. No torch needed, except for the engine's CUDA buffers.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploy.runners import open_model, runtime_name
from deploy.runtime import PROVIDERS
from deploy.trt_engine import ENGINE_PROVIDER
from mlpruning import __version__
from mlpruning.core.errors import UserError
from mlpruning.core.hf_config import position_limit
from mlpruning.core.jsonfile import read_json


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 8)
    seqs: tuple[int, ...] = (128, 384)
    threads: int = 1
    warmup: int = 5
    rounds: int = 7
    iters: int = 10
    provider: str = "cpu"
    engine: bool = False

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got '{self.provider}'")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
        if not self.seqs or min(self.seqs) < 1 or max(self.seqs) > 4096:
            raise ValueError(f"sequence lengths must be in [1, 4096], got {self.seqs}")
        for name in ("threads", "rounds", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _check_lengths(folder: Path, seqs: tuple[int, ...]) -> None:
    """A sequence past the position table fails deep inside ORT's Gather: refuse it up front."""
    config = read_json(folder / "config.json", "re-run mlpruning export")
    limit = position_limit(config) if config else None
    if limit is not None and max(seqs) > limit:
        raise UserError(
            f"--seq {max(seqs)} is longer than {folder} takes ({limit} positions): pass --seq {limit} or less"
        )


def _inputs(session: Any, batch: int, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = rng.integers(1000, 5000, (batch, seq), dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((batch, seq), dtype=np.int64)
        else:
            feeds[inp.name] = np.zeros((batch, seq), dtype=np.int64)
    return feeds


def _timed(session: Any, feeds: dict[str, np.ndarray], iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, feeds)
        out.append(time.perf_counter() - start)
    return out


def _stats(times: list[float], batch: int) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {
        "p50_ms": round(p50, 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "throughput_seq_per_s": round(batch * 1e3 / p50, 2),
    }


def _point(sessions: dict[str, Any], batch: int, seq: int, cfg: BenchConfig) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    feeds = {name: _inputs(s, batch, seq, rng) for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, s in sessions.items():
        _timed(s, feeds[name], cfg.warmup)
    ratios = []
    for _ in range(cfg.rounds):
        round_means = {}
        for name, s in sessions.items():
            t = _timed(s, feeds[name], cfg.iters)
            times[name].extend(t)
            round_means[name] = float(np.mean(t))
        if "baseline" in sessions:
            ratios.append(round_means["baseline"] / round_means["model"])
    result: dict[str, Any] = {"batch": batch, "seq": seq, **{k: _stats(v, batch) for k, v in times.items()}}
    if ratios:
        result["speedup_median"] = round(float(np.median(ratios)), 3)
        result["speedup_rounds"] = [round(r, 3) for r in ratios]
    return result


def bench(model_dir: Path, baseline_dir: Path | None, cfg: BenchConfig) -> dict[str, Any]:
    import onnxruntime as ort

    for folder in (model_dir, baseline_dir):
        if folder is not None:
            _check_lengths(folder, cfg.seqs)
    sessions = {"model": open_model(model_dir, cfg.threads, cfg.provider, cfg.engine)}
    if baseline_dir is not None:
        sessions["baseline"] = open_model(baseline_dir, cfg.threads, cfg.provider)
    points = [_point(sessions, b, s, cfg) for b in cfg.batches for s in cfg.seqs]
    return {
        "model": str(model_dir),
        "baseline": str(baseline_dir) if baseline_dir else None,
        "config": cfg.__dict__ | {"batches": list(cfg.batches), "seqs": list(cfg.seqs)},
        "points": points,
        "environment": {
            "onnxruntime": ort.__version__,
            "mlpruning": __version__,
            "python": platform.python_version(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            **_providers(sessions),
        },
    }


def _providers(sessions: dict[str, Any]) -> dict[str, Any]:
    """What each side really ran on (never the asked-for name: a fall-back would show here)."""
    out: dict[str, Any] = {"provider": runtime_name(sessions["model"])}
    if "baseline" in sessions:
        out["baseline_provider"] = runtime_name(sessions["baseline"])
    if ENGINE_PROVIDER in out.values():
        import tensorrt

        out["tensorrt"] = tensorrt.__version__
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'batch':>5} {'seq':>5} {'p50 ms':>9} {'p99 ms':>9} {'base p50':>9} {'speedup':>8}"]
    for p in report["points"]:
        base = p.get("baseline", {}).get("p50_ms")
        speed = p.get("speedup_median")
        lines.append(
            f"{p['batch']:>5} {p['seq']:>5} {p['model']['p50_ms']:>9.2f} {p['model']['p99_ms']:>9.2f} "
            f"{f'{base:.2f}' if base is not None else '-':>9} {f'{speed:.2f}x' if speed else '-':>8}"
        )
    return "\n".join(lines)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
