"""GLUE-format tasks: their files, how to read them, and their labels.

The embedded copies live in ``pipeline/data/glue`` (see its README for origin, licenses and
row counts). Each embedded file is checked against ``checksums.json`` (sha256 and row count)
every time it is read, so a corrupt install is reported instead of silently training on bad
data. A user's own ``--data-dir`` is laid out like GLUE's ``download_glue_data.py`` output
(``SST-2/train.tsv`` ...); its files are not hashed (they are the user's), but every row is
checked for its column count and label.

TSV columns are found by header name, so both GLUE's layouts and trimmed ones with the same
headers are read. MNLI dev-matched is embedded as MultiNLI JSON lines
(``premise``/``hypothesis``/``label``); GLUE's ``dev_matched.tsv`` works from a data dir too.
This module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from mlpruning.core.errors import UserError
from pipeline.kinds import get_kind
from pipeline.task_kind import TaskKind

EMBEDDED_DIR = Path(__file__).parent / "data" / "glue"


class MissingSplit(UserError):
    """The asked-for split has no file (embedded or in --data-dir)."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its folder, columns, labels and metrics, and its kind (what the model
    outputs for it: :mod:`pipeline.task_kind`)."""

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...]  # raw label strings in id order; empty for regression
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    split_files: tuple[tuple[str, tuple[str, ...]], ...]  # split -> candidate file names
    jsonl_columns: tuple[str, ...] = ()  # text fields, then label field, in JSON-lines files
    kind_name: str = "classification"

    def __post_init__(self) -> None:
        get_kind(self.kind_name)  # an unknown kind fails where the task is declared

    @property
    def kind(self) -> TaskKind:
        return get_kind(self.kind_name)

    @property
    def pairs(self) -> bool:
        """Whether an example is a text pair."""
        return len(self.text_columns) == 2

    def files_for(self, split: str) -> tuple[str, ...]:
        for name, files in self.split_files:
            if name == split:
                return files
        known = ", ".join(name for name, _ in self.split_files)
        raise UserError(f"task {self.name} has no split '{split}' (known: {known})")


_TRAIN_DEV = (("train", ("train.tsv",)), ("dev", ("dev.tsv",)))
_MNLI_LABELS = ("entailment", "neutral", "contradiction")

TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        "sst2",
        "SST-2",
        ("sentence",),
        "label",
        ("0", "1"),
        ("negative", "positive"),
        ("accuracy",),
        "accuracy",
        _TRAIN_DEV,
    ),
    "mrpc": TaskSpec(
        "mrpc",
        "MRPC",
        ("#1 String", "#2 String"),
        "Quality",
        ("0", "1"),
        ("not_equivalent", "equivalent"),
        ("accuracy", "f1"),
        "f1",
        _TRAIN_DEV,
    ),
    "rte": TaskSpec(
        "rte",
        "RTE",
        ("sentence1", "sentence2"),
        "label",
        ("entailment", "not_entailment"),
        ("entailment", "not_entailment"),
        ("accuracy",),
        "accuracy",
        _TRAIN_DEV,
    ),
    "stsb": TaskSpec(
        "stsb",
        "STS-B",
        ("sentence1", "sentence2"),
        "score",
        (),
        ("similarity",),
        ("pearson", "spearman"),
        "pearson",
        _TRAIN_DEV,
        kind_name="regression",
    ),
    "mnli": TaskSpec(
        "mnli",
        "MNLI",
        ("sentence1", "sentence2"),
        "gold_label",
        _MNLI_LABELS,
        _MNLI_LABELS,
        ("accuracy",),
        "accuracy",
        (("train", ("train.tsv",)), ("dev", ("dev_matched.jsonl", "dev_matched.tsv"))),
        jsonl_columns=("premise", "hypothesis", "label"),
    ),
}
_ALIASES = {"sst-2": "sst2", "sst": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}


def register_task(task: TaskSpec) -> None:
    """Add a task (its files, columns, labels, metrics and kind) under ``task.name``."""
    if task.name != task.name.lower():
        raise ValueError(f"task names are lower case (get_task lowers what users type): {task.name!r}")
    if task.name in TASKS or task.name in _ALIASES:
        raise ValueError(f"task {task.name!r} is registered already")
    TASKS[task.name] = task


@dataclass(frozen=True)
class Examples:
    """One split of a task: text columns and labels (class ids, or floats for regression)."""

    texts: tuple[tuple[str, ...], ...]  # one tuple of strings per example
    labels: tuple[float, ...]
    source: str

    def __len__(self) -> int:
        return len(self.labels)


def get_task(name: str) -> TaskSpec:
    # names also come from JSON and TOML files, where `"task": 5` would fail at .lower()
    if not isinstance(name, str):
        raise UserError(f"task must be a task name, one of {', '.join(TASKS)}; got {name!r}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise UserError(f"unknown task '{name}': choose one of {', '.join(TASKS)}")
    return TASKS[key]


@cache
def _embedded_checksums() -> dict[str, dict]:
    return json.loads((EMBEDDED_DIR / "checksums.json").read_text(encoding="utf-8"))


def verify_embedded(rel: str) -> Path:
    """Return the path of an embedded data file after checking its sha256 and row count."""
    expected = _embedded_checksums().get(rel)
    path = EMBEDDED_DIR / rel
    if expected is None or not path.is_file():
        raise UserError(f"embedded data file {rel} is missing: reinstall mlpruning or pass --data-dir")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected["sha256"]:
        raise UserError(
            f"embedded data file {path} is corrupt (sha256 {digest[:12]}... expected "
            f"{expected['sha256'][:12]}...): reinstall mlpruning or pass --data-dir"
        )
    return path


def locate(task: TaskSpec, split: str, data_dir: Path | None) -> tuple[Path, bool]:
    """Find the file of ``task``/``split``: (path, is_embedded)."""
    candidates = task.files_for(split)
    if data_dir is not None:
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir} is not a folder: pass a GLUE data folder")
        for name in candidates:
            path = data_dir / task.folder / name
            if path.is_file():
                return path, False
        raise MissingSplit(
            f"{data_dir / task.folder / candidates[0]} not found: --data-dir must hold GLUE "
            f"task folders such as {task.folder}/{candidates[0]}"
        )
    for name in candidates:
        rel = f"{task.folder}/{name}"
        if rel in _embedded_checksums():
            return verify_embedded(rel), True
    raise MissingSplit(
        f"task {task.name} has no embedded {split} split (only "
        f"{', '.join(k for k in _embedded_checksums() if k.startswith(task.folder + '/'))}): "
        f"pass --data-dir with {task.folder}/{candidates[0]}"
    )


def load_split(task: TaskSpec, split: str, data_dir: Path | None = None) -> Examples:
    """Read one split of a task, from the embedded copy or from ``data_dir``."""
    path, embedded = locate(task, split, data_dir)
    if path.suffix == ".jsonl":
        examples = _read_jsonl(task, path)
    else:
        examples = _read_tsv(task, path)
    if embedded:
        rows = _embedded_checksums()[f"{task.folder}/{path.name}"]["rows"]
        if len(examples) != rows:
            raise UserError(f"{path} has {len(examples)} rows, expected {rows}: reinstall mlpruning")
    if len(examples) == 0:
        raise UserError(f"{path} has no examples: pass a non-empty GLUE file")
    return examples


def _parse_label(task: TaskSpec, raw: str, where: str) -> float:
    try:
        return task.kind.parse_label(task, raw.strip())
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def _read_text(path: Path, encoding: str, kind: str) -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 text (byte {exc.start}): pass UTF-8 {kind} in the GLUE format"
        ) from None


def _read_tsv(task: TaskSpec, path: Path) -> Examples:
    lines = _read_text(path, "utf-8-sig", "tab-separated text").splitlines()
    if not lines:
        raise UserError(f"{path} is empty: pass a GLUE-format TSV with a header line")
    header = lines[0].split("\t")
    wanted = (*task.text_columns, task.label_column)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise UserError(
            f"{path} lacks column(s) {', '.join(missing)} (header: {', '.join(header)}): "
            f"pass the GLUE {task.folder} file"
        )
    idx = [header.index(c) for c in wanted]
    texts, labels = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) <= max(idx):
            raise UserError(
                f"{path} line {lineno}: {len(cols)} columns, expected {len(header)}: "
                "the file is truncated or not tab-separated"
            )
        texts.append(tuple(cols[i].strip() for i in idx[:-1]))
        labels.append(_parse_label(task, cols[idx[-1]], f"{path} line {lineno}"))
    return Examples(tuple(texts), tuple(labels), str(path))


def _read_jsonl(task: TaskSpec, path: Path) -> Examples:
    *text_keys, label_key = task.jsonl_columns
    texts, labels = [], []
    for lineno, line in enumerate(_read_text(path, "utf-8", "JSON lines").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(tuple(str(row[k]).strip() for k in text_keys))
            raw = str(row[label_key])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(
                f"{path} line {lineno}: not a JSON object with "
                f"{', '.join(task.jsonl_columns)} ({exc.__class__.__name__})"
            ) from None
        labels.append(_parse_label(task, raw, f"{path} line {lineno}"))
    return Examples(tuple(texts), tuple(labels), str(path))
