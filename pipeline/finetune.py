"""Dense fine-tuning of the teacher, resumable and interruption-safe.

Optimisation is the usual BERT recipe: AdamW (no decay on biases and LayerNorm), linear warm-up
over ``warmup_ratio`` of the steps then linear decay to 0, gradient clipping. Batches come from
the length-bucketed plan of :mod:`pipeline.batching`.

Resuming: every ``save_every`` steps the whole training state (weights, optimizer, scheduler,
torch RNG, step, eval history) is written atomically to ``OUT/resume/state.pt``. The batch plan
of an epoch depends only on (seed, epoch), and dropout draws on the saved RNG, so a run stopped
and resumed ends with the same weights as one that never stopped. Ctrl-C / SIGTERM stop at the
next step boundary after saving; a hard kill loses at most ``save_every`` steps.

Outputs in OUT: a Hugging Face checkpoint (``config.json``, ``model.safetensors``, tokenizer
files), ``mlpruning.json`` (task, config, base model, versions, wall time) and ``eval.json``
(dev metrics), written last, which marks the run as complete.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlpruning import __version__
from mlpruning.atomic import staging_dir, write_json, write_with
from mlpruning.errors import UserError
from pipeline.batching import Encoded, bucketed_batches, collate, encode
from pipeline.config import FinetuneConfig
from pipeline.evaluate import METADATA_FILE, EvalResult, evaluate_encoded
from pipeline.models import load_for_task, load_tokenizer, quiet_transformers, resolve_model
from pipeline.progress import TrainProgress
from pipeline.tasks import get_task, load_split

log = logging.getLogger(__name__)

RESUME_FILE = Path("resume") / "state.pt"
EVAL_FILE = "eval.json"


class Interrupted(Exception):
    """Training stopped on request after saving its state; ``--resume`` continues it."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"stopped at step {step}/{total}; state saved, continue with --resume")
        self.step, self.total = step, total


@dataclass
class _State:
    step: int = 0
    elapsed: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a finished run or silently restart an interrupted one."""
    finished = (out / EVAL_FILE).is_file()
    pending = (out / RESUME_FILE).is_file()
    if overwrite:
        shutil.rmtree(out / RESUME_FILE.parent, ignore_errors=True)
        (out / EVAL_FILE).unlink(missing_ok=True)
        return
    if resume and not pending:
        raise UserError(f"{out} has no interrupted run to resume: drop --resume")
    if finished and not pending:
        raise UserError(f"{out} already holds a fine-tuned model: choose another --out or pass --overwrite")
    if pending and not resume:
        raise UserError(
            f"{out} holds an interrupted run: pass --resume to continue or --overwrite to restart"
        )


@contextmanager
def _stop_on_signal() -> Iterator[list[bool]]:
    """Turn SIGINT/SIGTERM into a flag checked between steps, so state is never half-saved."""
    flag = [False]

    def handler(signum: int, frame: object) -> None:
        flag[0] = True

    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield flag
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(total: int, warmup: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class Finetuner:
    """One fine-tuning run into ``out``."""

    def __init__(self, cfg: FinetuneConfig, out: Path, progress: TrainProgress | None = None) -> None:
        self.cfg, self.out = cfg, out
        self.task = get_task(cfg.task)
        self.progress = progress or TrainProgress(enabled=False)
        data_dir = Path(cfg.data_dir) if cfg.data_dir else None
        self.tokenizer = load_tokenizer(cfg.model)
        train = load_split(self.task, "train", data_dir)
        self.train = encode(self.tokenizer, train, cfg.max_length)
        if cfg.max_train_examples and cfg.max_train_examples < len(self.train):
            self.train = _subset(self.train, cfg.max_train_examples, cfg.seed)
        self.dev = encode(self.tokenizer, load_split(self.task, "dev", data_dir), cfg.max_length)
        torch.manual_seed(cfg.seed)
        self.model = load_for_task(cfg.model, self.task)
        self.steps_per_epoch = math.ceil(len(self.train) / cfg.batch_size)
        self.total_steps = math.ceil(cfg.epochs * self.steps_per_epoch)
        # The fused CPU kernel makes the step ~5x cheaper than the for-each one (MiniLM, 2 cores).
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, cfg.weight_decay), lr=cfg.learning_rate, fused=True
        )
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_schedule(self.total_steps, warmup)
        )
        self.state = _State()

    # -- resume state ---------------------------------------------------------------------
    def save_state(self) -> None:
        blob = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "step": self.state.step,
            "elapsed": self.state.elapsed,
            "history": self.state.history,
            "config": self.cfg.to_dict(),
        }
        write_with(self.out / RESUME_FILE, lambda tmp: torch.save(blob, tmp))

    def load_state(self) -> None:
        path = self.out / RESUME_FILE
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(
                f"{path} is unreadable ({exc.__class__.__name__}): pass --overwrite to restart"
            ) from None
        saved = blob["config"]
        diff = [k for k, v in self.cfg.to_dict().items() if saved.get(k) != v]
        if diff:
            k = diff[0]
            raise UserError(
                f"{self.out} was started with {k}={saved.get(k)!r}, not {getattr(self.cfg, k)!r}: "
                "resume with the same options or pass --overwrite"
            )
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["rng"])
        self.state = _State(blob["step"], blob["elapsed"], list(blob["history"]))

    # -- training -------------------------------------------------------------------------
    def _train_step(self, indices: np.ndarray) -> tuple[float, int]:
        batch = collate(self.train, indices)
        dtype = torch.float32 if self.task.is_regression else torch.long
        labels = torch.as_tensor(self.train.labels[indices], dtype=dtype)
        loss = self.model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), int(batch["attention_mask"].sum())

    def _evaluate(self, epoch: float) -> EvalResult:
        result = evaluate_encoded(self.model, self.task, self.dev, "dev")
        self.state.history.append({"step": self.state.step, "epoch": round(epoch, 3), **result.metrics})
        self.progress.log_eval(self.state.step, epoch, result.metrics)
        return result

    def run(self, resume: bool = False, stop_at_step: int | None = None) -> EvalResult:
        """Train to the end (or until stopped), then write the checkpoint and ``eval.json``.

        ``stop_at_step`` stops as a Ctrl-C would at that step (used by the tests).
        """
        if resume:
            self.load_state()
        self.model.train()
        result = None
        plan_epoch, plan = -1, []
        started = time.perf_counter() - self.state.elapsed
        with _stop_on_signal() as stop, self.progress.training(self.total_steps, self.state.step) as bar:
            while self.state.step < self.total_steps:
                epoch, k = divmod(self.state.step, self.steps_per_epoch)
                if epoch != plan_epoch:
                    plan_epoch, plan = (
                        epoch,
                        bucketed_batches(self.train.lengths, self.cfg.batch_size, self.cfg.seed, epoch),
                    )
                loss, tokens = self._train_step(plan[k])
                self.state.step += 1
                self.state.elapsed = time.perf_counter() - started
                bar.update(loss, tokens, self.scheduler.get_last_lr()[0])
                if self.state.step % self.steps_per_epoch == 0 or self.state.step == self.total_steps:
                    result = self._evaluate(self.state.step / self.steps_per_epoch)
                if self.state.step % self.cfg.save_every == 0 or stop[0] or self.state.step == stop_at_step:
                    self.save_state()
                if (stop[0] or self.state.step == stop_at_step) and self.state.step < self.total_steps:
                    raise Interrupted(self.state.step, self.total_steps)
        if result is None:  # resumed exactly at the end: evaluate the saved weights
            result = self._evaluate(self.state.step / self.steps_per_epoch)
        self.finalize(result)
        return result

    def finalize(self, result: EvalResult) -> None:
        meta = {
            "format_version": 1,
            "kind": "finetuned",
            "task": self.task.name,
            "base_model": self.cfg.model,
            "base_model_source": resolve_model(self.cfg.model),
            "config": self.cfg.to_dict(),
            "steps": self.state.step,
            "train_examples": len(self.train),
            "wall_time_s": round(self.state.elapsed, 1),
            "history": self.state.history,
            "versions": _versions(),
        }
        with staging_dir(self.out) as tmp, quiet_transformers():
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / METADATA_FILE, meta)
        write_json(self.out / EVAL_FILE, {**result.to_json(), "wall_time_s": meta["wall_time_s"]})
        shutil.rmtree(self.out / RESUME_FILE.parent, ignore_errors=True)


def _subset(encoded: Encoded, n: int, seed: int) -> Encoded:
    idx = np.sort(np.random.default_rng(seed).permutation(len(encoded))[:n])
    feats = {k: [v[i] for i in idx] for k, v in encoded.features.items()}
    return Encoded(feats, encoded.labels[idx], encoded.pad_id)


def _versions() -> dict[str, str]:
    import transformers

    return {"mlpruning": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
