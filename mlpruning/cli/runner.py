"""`mlpruning run`: the whole pipeline into one run folder, restartable stage by stage.

Stages, in order (layout: :mod:`deploy.run_layout`): ``teacher`` (fine-tune, or link the
configured checkpoint), ``step1``, ``step2`` (if configured), ``export:<v>`` for each
variant, ``optimize:<v>`` for the pruned ones, ``verify:<v>``, ``bench:<v>`` (pruned vs the
dense export, interleaved), then the summary and the report (always rewritten; cheap).

Skipping. Each stage has an input hash: SHA-256 of its own config table and of the output
hashes of the stages it reads. Its output hash is SHA-256 over the file names and contents
of what it wrote (a training's ``resume/`` state left out). ``run.json`` keeps both per
stage. A stage is skipped when its completion file exists, its recorded input hash equals
the current one and its output still hashes to the recorded value; otherwise it is rerun
from scratch, and everything downstream follows because their input hashes change. Folders of
the run itself (a pruning step's teacher or source) count by name, their content being a
dependency, so a run folder moved or copied elsewhere skips what it finished; records written
before that rule (full paths in the hash) still match where the run has not moved.

Restart. A training stage records ``started`` with its input hash before it runs; killed
part-way, it leaves ``resume/state.pt``, and the next ``mlpruning run`` resumes it (same
inputs) instead of starting over. Verify failures do not stop the run: the report shows
them and the command exits 1 at the end. Nor does a stage that ``may_fail`` (quantize: no INT8
copy within the bounds is a finding about the model, not a broken run): its check failure is
recorded in ``run.json`` as ``failed`` with the reason, the stages that read it are left out
(``blocked``), and the rest of the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy import run_layout as L
from mlpruning.cli.run_config import RunConfig
from mlpruning.core.atomic import write_json
from mlpruning.core.contract import DEFAULT_VARIANTS, Variant
from mlpruning.core.errors import CheckFailed
from mlpruning.core.jsonfile import read_json

STATE_FORMAT = 1
RESUME_DIR = "resume"


@dataclass(frozen=True)
class Stage:
    name: str
    out: Path  # the folder or file the stage writes
    done: Path  # present once the stage finished
    deps: tuple[str, ...]
    action: Callable[[bool], Any]  # called with resume=True/False; returns a small JSON result
    trains: bool = False
    may_fail: bool = False  # a CheckFailed is recorded and the run goes on without its readers


def content_hash(path: Path) -> str:
    """SHA-256 over relative names and bytes of every file under ``path`` (or of one file)."""
    digest = hashlib.sha256()
    root = path.resolve()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        rel = file.relative_to(root).as_posix() if file != root else file.name
        if rel.startswith(f"{RESUME_DIR}/") or "/." in f"/{rel}":  # resume state, staging leftovers
            continue
        digest.update(rel.encode() + b"\0")
        with file.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class RunState:
    """``run.json``: per-stage hashes and timings, rewritten atomically after every change."""

    def __init__(
        self, run: Path, config_file: Path, variants: tuple[Variant, ...] = DEFAULT_VARIANTS
    ) -> None:
        self.path = run / L.RUN_STATE
        self.data: dict[str, Any] = {
            "format": STATE_FORMAT,
            "config_file": str(config_file),
            "variants": [v.to_json() for v in variants],  # what every reader of the run lists
            "stages": {},
        }
        old = read_json(self.path, "delete it to rerun every stage")
        if old is not None:
            self.data["stages"] = old.get("stages", {})

    def get(self, stage: str) -> dict[str, Any]:
        return self.data["stages"].get(stage, {})

    def put(self, stage: str, **record: Any) -> None:
        self.data["stages"][stage] = record
        write_json(self.path, self.data)


def input_hash(stage: Stage, cfg: RunConfig, state: RunState, legacy: bool = False) -> str:
    deps = {d: state.get(d).get("output_hash") for d in stage.deps}
    inputs = {"stage": stage.name, "config": cfg.stage_inputs(stage.name, legacy), "deps": deps}
    blob = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _clear(path: Path) -> None:
    """Remove a stage's old output; a linked teacher loses the link, never its target."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def decide(stage: Stage, ih: str, state: RunState, legacy: str | None = None) -> str:
    """'skip', 'resume', 'failed' or 'run' for a stage whose current input hash is ``ih`` (or
    ``legacy``, the same inputs as a run written before the current hashing rule saw them)."""
    rec = state.get(stage.name)
    if rec.get("input_hash") in (ih, legacy or ih):
        if rec.get("status") == "failed" and stage.may_fail:
            return "failed"  # same inputs, same finding: not measured again
        if rec.get("status") == "done" and stage.done.exists():
            if content_hash(stage.out) == rec.get("output_hash"):
                return "skip"
        if rec.get("status") == "started" and stage.trains and (stage.out / RESUME_DIR).is_dir():
            return "resume"
    return "run"


def execute(
    stages: list[Stage], cfg: RunConfig, state: RunState, log: Callable[[str], None], rerun: set[str]
) -> dict[str, Any]:
    """Run or skip each stage in order; returns {stage: result} of this invocation (a failed
    stage's result: {"failed": reason}; a stage left out behind it: {"blocked": that stage})."""
    results: dict[str, Any] = {}
    for stage in stages:
        behind = [d for d in stage.deps if state.get(d).get("status") in ("failed", "blocked")]
        if behind:
            log(f"[{stage.name}] left out: {behind[0]} did not finish")
            state.put(stage.name, status="blocked", by=behind[0])
            results[stage.name] = {"blocked": behind[0]}
            continue
        results[stage.name] = _run_stage(stage, cfg, state, log, stage.name in rerun)
    return results


def _run_stage(
    stage: Stage, cfg: RunConfig, state: RunState, log: Callable[[str], None], forced: bool
) -> Any:
    ih = input_hash(stage, cfg, state)
    action = "run" if forced else decide(stage, ih, state, input_hash(stage, cfg, state, legacy=True))
    if action == "skip":
        log(f"[{stage.name}] unchanged, skipped")
        return state.get(stage.name).get("result")
    if action == "failed":
        reason = state.get(stage.name).get("reason")
        log(f"[{stage.name}] unchanged, FAILED before: {reason}")
        return {"failed": reason}
    log(f"[{stage.name}] {'resuming' if action == 'resume' else 'running'}")
    if action == "run":
        _clear(stage.out)
    state.put(stage.name, status="started", input_hash=ih)
    start = time.perf_counter()
    try:
        result = stage.action(action == "resume")
    except CheckFailed as exc:
        if not stage.may_fail:
            raise
        state.put(stage.name, status="failed", input_hash=ih, reason=str(exc))
        log(f"[{stage.name}] FAILED: {exc}")
        return {"failed": str(exc)}
    seconds = round(time.perf_counter() - start, 1)
    state.put(
        stage.name,
        status="done",
        input_hash=ih,
        output_hash=content_hash(stage.out),
        seconds=seconds,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        result=result,
    )
    log(f"[{stage.name}] done in {seconds:,.1f} s")
    return result
