"""Typed, validated configs: frozen dataclasses read from CLI options or TOML.

Each field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field
and its allowed range, which the CLI reports as a one-line error (exit 2).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlpruning.core.contract import MAX_BLOCK_SIDE, parse_block_shape
from mlpruning.core.errors import UserError
from pipeline.models import DEFAULT_MODEL
from pipeline.tasks import get_task

T = TypeVar("T")
THRESHOLD_GRADS = ("sigmoid", "constant")  # see pipeline.pruning.regularizer


def _check(cond: bool, field: str, rule: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{field} must be {rule}, got {value!r}")


def _check_training(cfg: Any) -> None:
    """Fields every training config shares."""
    _check(0 < cfg.epochs <= 100, "epochs", "in (0, 100]", cfg.epochs)
    _check(1 <= cfg.batch_size <= 4096, "batch_size", "in [1, 4096]", cfg.batch_size)
    _check(0 < cfg.learning_rate < 1, "learning_rate", "in (0, 1)", cfg.learning_rate)
    _check(0 <= cfg.weight_decay < 1, "weight_decay", "in [0, 1)", cfg.weight_decay)
    _check(0 <= cfg.warmup_ratio < 1, "warmup_ratio", "in [0, 1)", cfg.warmup_ratio)
    _check(cfg.max_grad_norm > 0, "max_grad_norm", "> 0", cfg.max_grad_norm)
    _check(8 <= cfg.max_length <= 4096, "max_length", "in [8, 4096]", cfg.max_length)
    _check(cfg.save_every >= 1, "save_every", ">= 1", cfg.save_every)
    n = cfg.max_train_examples
    _check(n is None or n >= 1, "max_train_examples", ">= 1 or unset", n)


@dataclass(frozen=True)
class FinetuneConfig:
    """Dense fine-tuning of an encoder on a GLUE task (the teacher of later steps)."""

    task: str
    model: str = DEFAULT_MODEL
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 42
    save_every: int = 200
    max_train_examples: int | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", get_task(self.task).name)
        _check_training(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_mapping(cls: type[T], values: dict[str, Any], source: str) -> T:
    """Build a config from a mapping, naming unknown keys and wrong value types.

    Types are checked against the field annotations before ``cls`` is built, because the
    ``__post_init__`` range checks let some wrong types through (``batch_size = 16.5``) and trip
    on others with a bare TypeError; TOML lists become tuples for ``tuple[...]`` fields.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    typed = {}
    for key, value in values.items():
        try:
            typed[key] = _as_type(hints[key], value)
        except _WrongType:
            raise UserError(f"{source} {key}: expected {_describe(hints[key])}, got {value!r}") from None
    try:
        return cls(**typed)
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None
    except TypeError as exc:
        raise UserError(f"{source}: {exc}") from None


class _WrongType(Exception):
    """A value does not fit a field's annotation (turned into a UserError by from_mapping)."""


_SCALARS: dict[Any, tuple[str, str]] = {  # annotation -> (one, several), for messages
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
    str: ("a string", "strings"),
    Path: ("a path string", "path strings"),
}


def _as_type(hint: Any, value: Any) -> Any:
    """``value`` if it fits ``hint`` (lists as tuples for tuple fields, strings as Paths)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _as_type(arg, value)
            except _WrongType:
                continue
        raise _WrongType
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        item = args[0] if args else Any
        return origin(_as_type(item, v) for v in value)
    return _as_scalar(hint, value)


def _as_scalar(hint: Any, value: Any) -> Any:
    # bool is a subclass of int: `batch_size = true` must not pass as 1
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        # an int is a fine float (`epochs = 2`); kept as given so stage input hashes do not change
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is Path:
        if not isinstance(value, (str, Path)):
            raise _WrongType
        return Path(value)
    else:
        ok = True  # Any and annotations this checker does not know: left to __post_init__
    if not ok:
        raise _WrongType
    return value


def _describe(hint: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        # None cannot be written in TOML: leaving the key out is how it is unset
        return " or ".join(_describe(a, plural) for a in args if a is not type(None))
    if origin in (tuple, list):
        return f"a list of {_describe(args[0], plural=True) if args else 'values'}"
    one, several = _SCALARS.get(hint, (str(hint), str(hint)))
    return several if plural else one


def build_config(
    cls: type[T],
    section: str,
    path: Path | None,
    overrides: dict[str, Any],
    required: tuple[str, ...],
    drop: tuple[str, ...] = (),
    flags: dict[str, str] | None = None,
) -> T:
    """A config from an optional TOML table, overridden by the CLI options that were given.

    ``drop`` names TOML keys read elsewhere (the pruning ``step``), not fields of ``cls``;
    ``flags`` names the CLI option of a field whose flag is not ``--field-name``.
    """
    values = load_toml(path, section) if path else {}
    for key in drop:
        values.pop(key, None)
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in required if k not in values]
    if missing:
        names = ", ".join((flags or {}).get(m, "--" + m.replace("_", "-")) for m in missing)
        raise UserError(f"missing {names}: pass them or set them in the [{section}] table of --config")
    return from_mapping(cls, values, f"{path} [{section}]" if path else "options")


def load_toml(path: Path, section: str) -> dict[str, Any]:
    """The ``section`` table of a TOML file, or the whole file when it has no such table."""
    if not path.is_file():
        raise UserError(f"config file {path} not found: check the path")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: save the config as UTF-8 TOML") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path} ({exc.strerror}): check its permissions") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML ({exc})") from None
    table = data.get(section, data)
    if not isinstance(table, dict):
        raise UserError(f"{path}: {section} must be a [{section}] table of key = value lines, not {table!r}")
    return dict(table)


@dataclass(frozen=True, kw_only=True)
class PruneTraining:
    """Training, regularizer and distillation settings both pruning steps share (keyword-only)."""

    epochs: float = 3.0
    batch_size: int = 32
    learning_rate: float = 5e-5
    mask_learning_rate: float = 1e-2
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 128
    lambda_final: float = 20000.0
    lambda_min: float = 50.0
    lambda_settled: float = 10.0
    settled_gap: float = 3e-4
    threshold_init: float = 10.0
    threshold_grad: str = "sigmoid"  # regularizer's push on t: sigmoid'(t) or a constant 1/4
    ratio_floor: bool = True  # lift thresholds back when the task gradient alone drifts r below r*
    score_init: float = 0.0
    alpha_distil: float = 0.9
    alpha_ce: float = 0.1
    temperature: float = 2.0
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    freeze_embeddings: bool = True
    seed: int = 42
    save_every: int = 200
    max_train_examples: int | None = None
    data_dir: str | None = None


@dataclass(frozen=True)
class PruneConfig(PruneTraining):
    """Step 1 of MLPruning: head and row pruning with learnable thresholds and distillation.

    Defaults follow the reference code (scores 0, thresholds 10, mask lr 1e-2, lambda_final
    20000 with floor 50 and 10 once within 3e-4, alpha_distil 0.9 / alpha_ce 0.1, T = 2), except
    that the student starts from the fine-tuned teacher and trains for few epochs, which is
    what a CPU budget allows.
    """

    task: str
    teacher: str
    target: float
    student: str | None = None  # default: a copy of the teacher

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", get_task(self.task).name)
        _check_pruning(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_pruning(cfg: Any) -> None:
    """Fields both pruning steps share."""
    _check(0 < cfg.target <= 1, "target", "in (0, 1]", cfg.target)
    _check_training(cfg)
    _check(0 < cfg.mask_learning_rate < 10, "mask_learning_rate", "in (0, 10)", cfg.mask_learning_rate)
    _check(cfg.lambda_final >= 0, "lambda_final", ">= 0", cfg.lambda_final)
    _check(cfg.lambda_min >= 0 and cfg.lambda_settled >= 0, "lambda_min", ">= 0", cfg.lambda_min)
    _check(cfg.threshold_init > 0, "threshold_init", "> 0 (keep everything at the start)", cfg.threshold_init)
    _check(cfg.temperature > 0, "temperature", "> 0", cfg.temperature)
    grad = cfg.threshold_grad
    _check(grad in THRESHOLD_GRADS, "threshold_grad", " or ".join(THRESHOLD_GRADS), grad)
    for name in ("alpha_distil", "alpha_ce", "hidden_weight", "attention_weight"):
        _check(getattr(cfg, name) >= 0, name, ">= 0", getattr(cfg, name))


PRUNE_STEPS = ("head_row", "block")


def parse_block(text: str | int) -> tuple[int, int]:
    """'32' -> (32, 32); '32x16' -> (32, 16), as (rows, columns) of the torch weight [out, in]."""
    shape = parse_block_shape(text)
    if shape is None:
        sides = f"sides in [1, {MAX_BLOCK_SIDE}]"
        raise ValueError(f"block must be N or NxM (rows x columns, {sides}), got {text!r}")
    return shape


def prune_step(path: Path | None, step: str | None) -> str:
    """The pruning step: ``--step`` if given, else ``step`` in the [prune] table, else head_row."""
    chosen = step or (load_toml(path, "prune").get("step") if path else None) or "head_row"
    chosen = str(chosen).replace("-", "_")
    if chosen not in PRUNE_STEPS:
        raise UserError(f"unknown pruning step '{chosen}': use head_row (step 1) or block (step 2)")
    return chosen


@dataclass(frozen=True)
class BlockPruneConfig(PruneTraining):
    """Step 2 of MLPruning: block pruning of a step-1 checkpoint, distilled from it.

    ``target`` is the remaining share of what step 1 kept (``target_of = "step1"``) or of the
    original encoder (``"original"``). ``block`` is N (N x N) or NxM, rows x columns of the
    torch weight [out, in]. Training defaults are those of step 1.
    """

    source: str  # the step-1 masked checkpoint: student start and teacher
    target: float
    target_of: str = "step1"
    block: str | int = "32"  # TOML `block = 32` is an int; stored as "RxC" by __post_init__
    row_balanced: bool = False
    task: str | None = None  # default: the step-1 checkpoint's
    revive_from: str | None = None  # weights of revived rows; default: step 1's student_init

    def __post_init__(self) -> None:
        if self.task is not None:
            object.__setattr__(self, "task", get_task(self.task).name)
        _check(bool(str(self.source).strip()), "source", "a step-1 checkpoint folder", self.source)
        _check(self.target_of in ("step1", "original"), "target_of", "step1 or original", self.target_of)
        bo, bi = parse_block(self.block)
        object.__setattr__(self, "block", f"{bo}x{bi}")  # one spelling, so resume compares equal
        _check_pruning(self)

    @property
    def block_shape(self) -> tuple[int, int]:
        return parse_block(self.block)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
