"""Live training progress with rich: step bar, smoothed loss, learning rate, throughput, ETA.

On a terminal the bar refreshes in place; elsewhere (CI logs, pipes) a plain line is printed
every ``log_every`` steps instead, so logs stay readable. Evaluation results are always printed
as their own line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(
        self, progress: Progress | None, task_id: int, console: Console, log_every: int, span: tuple[int, int]
    ) -> None:
        self.progress, self.task_id, self.console = progress, task_id, console
        self.log_every = log_every
        self.done, self.total = span
        self.loss_ema: float | None = None
        self.window_tokens = 0
        self.started = self.window_start = time.perf_counter()
        self.tok_per_s = 0.0
        self.steps = 0

    def _plain_line(self, stats: str) -> str:
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.steps * (self.total - self.done - self.steps)
        step = self.done + self.steps
        return f"step {step}/{self.total}: {stats}  elapsed {elapsed:,.0f}s  ETA {eta:,.0f}s"

    def update(self, loss: float, tokens: int, lr: float, extra: str = "") -> None:
        self.loss_ema = loss if self.loss_ema is None else 0.98 * self.loss_ema + 0.02 * loss
        self.window_tokens += tokens
        self.steps += 1
        now = time.perf_counter()
        if now - self.window_start >= 2.0:
            self.tok_per_s = self.window_tokens / (now - self.window_start)
            self.window_tokens, self.window_start = 0, now
        sep = "  " if extra else ""
        stats = f"loss {self.loss_ema:.4f}  {extra}{sep}lr {lr:.2e}  {self.tok_per_s:,.0f} tok/s"
        if self.progress is not None:
            self.progress.update(self.task_id, advance=1, stats=stats)
        elif self.log_every and self.steps % self.log_every == 0:
            self.console.print(self._plain_line(stats), markup=False, highlight=False, soft_wrap=True)


class TrainProgress:
    """Progress display for a training loop; ``enabled=False`` prints nothing."""

    def __init__(self, enabled: bool = True, console: Console | None = None, log_every: int = 100) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.log_every = log_every

    @contextmanager
    def training(self, total: int, done: int) -> Iterator[_Bar]:
        if not self.enabled or not self.console.is_terminal:
            yield _Bar(None, 0, self.console, self.log_every if self.enabled else 0, (done, total))
            return
        columns = (
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}", markup=False),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console) as progress:
            task_id = progress.add_task("train", total=total, completed=done, stats="")
            yield _Bar(progress, task_id, self.console, self.log_every, (done, total))

    def log_eval(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        if self.enabled:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.console.print(f"[green]eval[/] step {step} (epoch {epoch:.2f}): {shown}")
