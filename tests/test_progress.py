"""The plain (non-terminal) progress lines that CI logs show."""

from __future__ import annotations

import io

from rich.console import Console

from pipeline.progress import TrainProgress


def test_plain_lines_keep_brackets_and_stay_on_one_line():
    buf = io.StringIO()
    progress = TrainProgress(console=Console(file=buf, force_terminal=False, width=60), log_every=2)
    with progress.training(total=10, done=4) as bar:
        for _ in range(4):
            bar.update(0.5, 100, 1e-4, "[task 0.1 logit 0.2]  r 0.912/0.5  λ 20,000")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2  # every log_every steps, one line each despite the narrow console
    assert lines[-1].startswith("step 8/10: loss 0.5000  [task 0.1 logit 0.2]  r 0.912/0.5")
    assert "ETA" in lines[-1]
    progress.log_eval(8, 1.0, {"accuracy": 0.9})
    assert "accuracy 0.9000" in buf.getvalue()


def test_disabled_progress_prints_nothing():
    buf = io.StringIO()
    progress = TrainProgress(enabled=False, console=Console(file=buf, force_terminal=False))
    with progress.training(total=3, done=0) as bar:
        bar.update(0.5, 10, 1e-4)
    progress.log_eval(3, 1.0, {"accuracy": 0.5})
    assert buf.getvalue() == ""
