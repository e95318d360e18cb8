"""Reading the JSON files the stages write (manifests, reports, configs).

Each of these files is input to a later command, and a user can hand that command a truncated,
hand-edited or foreign file. Every such read goes through :func:`read_json`, so a bad file is a
one-line :class:`~mlpruning.core.errors.UserError` that names the file and the fix, never a
``JSONDecodeError`` traceback. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlpruning.core.contract import EXPORT_REPORT, MANIFEST_FILE
from mlpruning.core.errors import UserError

RERUN = "re-run the stage that writes it"


def read_json(path: Path, fix: str = RERUN) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when there is no such file.

    A file that is not UTF-8 JSON, or holds something other than an object, is a UserError that
    ends with ``fix``.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid JSON (not UTF-8 text): {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds no JSON object: {fix}")
    return data


def recorded_task(folder: Path) -> str | None:
    """The task an artifact folder was made for, as its export report (or, for a checkpoint, its
    manifest) records it; None when neither says."""
    for name in (EXPORT_REPORT, MANIFEST_FILE):
        task = (read_json(folder / name) or {}).get("task")
        if isinstance(task, str):
            return task
    return None
