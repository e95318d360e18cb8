"""What every ``mlpruning`` subcommand module shares: the typer app, common options, helpers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlpruning import __version__
from mlpruning.core.errors import UserError
from pipeline.tasks import TASKS

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    name="mlpruning",
    help="Multi-level structured pruning (heads, rows, blocks) for BERT-class encoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts name TOML tables such as [prune]: print them as written
)

TaskOpt = Annotated[str | None, typer.Option("--task", help=f"Task: {', '.join(TASKS)}.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Your own GLUE folder (SST-2/train.tsv ...); default: embedded copy."),
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="torch intra-op threads.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if present), cpu, cuda or cuda:N.")]
EpochsOpt = Annotated[float | None, typer.Option(help="Epochs (fractions allowed).")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed.")]
SaveEveryOpt = Annotated[int | None, typer.Option(help="Steps between resume checkpoints.")]
SubsetOpt = Annotated[int | None, typer.Option(help="Train on a random subset of this size.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace what --out holds.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]


def int_list(values: list[str], flag: str, example: str) -> tuple[int, ...]:
    """Integers from repeated and/or comma-separated option values (``--batch 1,8 --batch 16``)."""
    try:
        return tuple(int(v) for item in values for v in item.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} takes integers, e.g. {example}") from None


def echo_err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    # configs check this when read; a bool or float here would reach torch as a raw TypeError
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads must be an integer >= 1, got {threads!r}: fix --threads or [run] threads")
    import torch

    torch.set_num_threads(threads)


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"mlpruning {__version__}")
        raise typer.Exit()


LIST_FLAGS = ("--batch", "--seq")


def spread_list_flags(argv: list[str]) -> list[str]:
    """``--batch 1 8`` -> ``--batch 1 --batch 8``: click options take one value per flag.

    Only the flags in ``LIST_FLAGS`` are spread, and only over the integers that follow them.
    """
    out: list[str] = []
    flag, first_value_seen = None, False
    for arg in argv:
        if flag and first_value_seen and arg.replace(",", "").isdigit():
            out += [flag, arg]
            continue
        out.append(arg)
        if arg in LIST_FLAGS:
            flag, first_value_seen = arg, False
        elif flag and not first_value_seen:
            first_value_seen = True  # the flag's own value, whatever it is: click checks it
        else:
            flag = None
    return out
