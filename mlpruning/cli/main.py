"""The ``mlpruning`` command line: registration of every subcommand, and the entry point.

Every subcommand is a plain typed function; heavy imports (torch, transformers) happen inside
it so ``mlpruning --help`` is instant. A :class:`~mlpruning.core.errors.UserError` ends the
command with one line on stderr and exit code 2; a failed check (:class:`CheckFailed`) exits 1;
an interrupted run exits 130 after saving its state.
"""

from __future__ import annotations

import sys

import typer

# Each module registers its commands on the shared app when imported, in pipeline order for --help.
from mlpruning.cli import training  # noqa: F401  # isort: skip
from mlpruning.cli import onnx_cmds  # noqa: F401  # isort: skip
from mlpruning.cli import quantize_cmd  # noqa: F401  # isort: skip
from mlpruning.cli import deploy_cmds  # noqa: F401  # isort: skip
from mlpruning.cli import serve_cmd  # noqa: F401  # isort: skip
from mlpruning.cli import engines  # noqa: F401  # isort: skip
from mlpruning.cli import run_cmd  # noqa: F401  # isort: skip
from mlpruning.cli.common import app, echo_err, spread_list_flags
from mlpruning.core.errors import CheckFailed, UserError

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point: one-line errors, exit 2 for user errors.

    Click's own usage errors (an unknown option, ``--threads 0``) would print a boxed usage
    panel; outside standalone mode they reach here and get the same one line as a UserError.
    """
    try:
        code = app(args=spread_list_flags(sys.argv[1:]), prog_name="mlpruning", standalone_mode=False)
    except UserError as exc:
        echo_err(str(exc))
        sys.exit(2)
    except CheckFailed as exc:
        echo_err(str(exc))
        sys.exit(1)
    except typer.Abort:  # Ctrl-C outside a training loop (those save state and exit 130 themselves)
        echo_err("interrupted")
        sys.exit(130)
    except Exception as exc:
        if not _is_usage_error(exc):
            raise
        message = exc.format_message().rstrip(".")  # type: ignore[attr-defined]
        ctx = getattr(exc, "ctx", None)
        if message:  # empty after a bare `mlpruning`, which has printed the help already
            echo_err(f"{message}: see {ctx.command_path if ctx is not None else 'mlpruning'} --help")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def _is_usage_error(exc: Exception) -> bool:
    # recent typer raises its vendored copy of click's UsageError, older typer click's own
    return any(cls.__name__ == "UsageError" for cls in type(exc).__mro__)
