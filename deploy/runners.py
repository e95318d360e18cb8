"""Runtimes behind one interface: open a model folder and run it, for verify, bench and serve.

A *runner* is anything with the subset of an ONNX Runtime session the deploy stages use:
``get_inputs()`` / ``get_outputs()`` (objects with a ``name``), ``get_providers()`` (the first
entry names the runtime) and ``run(output_names, feeds) -> list[np.ndarray]``.

A *runtime* is registered as a :class:`Runtime`: a name, whether it claims a folder (given the
caller's ``engine`` flag: the folder's files say which runtime it is for), and how to open it.
They are asked in order; the first that claims the folder opens it. The built-in ones:

- ``tensorrt``: ``model.plan`` when ``engine`` is asked or when it is the folder's only model
  (:class:`deploy.trt_engine.TrtRunner`; needs tensorrt and a GPU);
- ``onnxruntime``: ``model.onnx`` with an execution provider (cpu, cuda, tensorrt), the default.

A new runtime is one module with its runner class plus one :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deploy.runtime import open_session
from deploy.trt_engine import ENGINE_PROVIDER, TrtRunner
from mlpruning.core.contract import ONNX_FILE, PLAN_FILE
from mlpruning.core.errors import UserError


class Runner(Protocol):
    def get_inputs(self) -> list[Any]: ...
    def get_outputs(self) -> list[Any]: ...
    def get_providers(self) -> list[str]: ...
    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class Runtime:
    """One way to run a model folder."""

    name: str
    claims: Callable[[Path, bool], bool]  # (folder, engine asked) -> this runtime opens it
    open: Callable[[Path, int | None, str], Runner]  # (folder, threads, provider) -> runner


def _plan_claims(folder: Path, engine: bool) -> bool:
    plan = folder / PLAN_FILE
    if engine and not plan.is_file():
        raise UserError(f"{folder} has no {PLAN_FILE}: build one with mlpruning build {folder} --fp16")
    return engine or (plan.is_file() and not (folder / ONNX_FILE).is_file())


RUNTIMES: list[Runtime] = [
    Runtime("tensorrt", _plan_claims, lambda folder, threads, provider: TrtRunner(folder / PLAN_FILE)),
    Runtime("onnxruntime", lambda folder, engine: True, open_session),
]


def register(runtime: Runtime, first: bool = True) -> None:
    """Add a runtime, asked before the built-in ones unless ``first`` is False."""
    RUNTIMES.insert(0 if first else len(RUNTIMES), runtime)


def open_model(
    folder: Path, threads: int | None = None, provider: str = "cpu", engine: bool = False
) -> Runner:
    """A runner for ``folder``: the first registered runtime that claims it."""
    for runtime in RUNTIMES:
        if runtime.claims(folder, engine):
            return runtime.open(folder, threads, provider)
    raise UserError(f"no runtime can open {folder}: pass a folder written by export, optimize or build")


def runtime_name(session: Runner) -> str:
    """The execution provider (or TensorRT engine) a runner runs on."""
    return session.get_providers()[0]


def model_label(folder: Path, session: Runner) -> str:
    return str(folder / PLAN_FILE) if runtime_name(session) == ENGINE_PROVIDER else str(folder)


def outputs_to_fetch(session: Runner, names: list[str]) -> list[str]:
    """The model outputs that hold a task kind's outputs ``names``: those names, or, for a model
    made elsewhere whose outputs are named otherwise but are as many, its first ones in order."""
    have = [o.name for o in session.get_outputs()]
    if set(names) <= set(have):
        return names
    if len(have) < len(names):
        fix = "export it with mlpruning export"
        raise UserError(f"the model has outputs {have}, the task needs {names}: {fix}")
    return have[: len(names)]
