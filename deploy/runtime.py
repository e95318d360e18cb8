"""ONNX Runtime sessions for verify, bench and serve: one place that picks the execution provider.

``provider`` is ``cpu`` (always there), ``cuda`` or ``tensorrt`` (both need the onnxruntime-gpu
package and a GPU). Asking for one that this onnxruntime build lacks, or one that fails to start
(ORT then quietly moves on to the next provider), is a one-line error naming the fix, never a
silent fall-back to the CPU: a latency measured on the wrong device would be reported as the
right one. Every session disables SkipLayerNormalization fusion at load
(see :mod:`graph_passes.ort_fusion`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graph_passes.ort_fusion import DISABLED_AT_LOAD
from mlpruning.core.contract import ONNX_FILE
from mlpruning.core.errors import UserError, first_line

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def providers_for(provider: str) -> list[str]:
    """The ORT provider list for ``provider``, or a UserError saying what to install."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise UserError(f"unknown provider '{provider}': use one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise UserError(
            f"{wanted[0]} is not in this onnxruntime ({', '.join(available)}): on a machine with a CUDA "
            "GPU, pip uninstall -y onnxruntime && pip install onnxruntime-gpu (the two packages share "
            "one module), or use --provider cpu"
        )
    return wanted


def model_path(folder: Path) -> Path:
    path = folder / ONNX_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {ONNX_FILE}: pass a folder written by export or optimize")
    return path


def open_session(folder: Path, threads: int | None = None, provider: str = "cpu") -> Any:
    """An InferenceSession on ``folder/model.onnx``; ``threads`` None leaves ORT's default."""
    import onnxruntime as ort

    path = model_path(folder)
    wanted = providers_for(provider)
    if provider != "cpu" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels when torch has not loaded them
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(
            str(path), options, providers=wanted, disabled_optimizers=DISABLED_AT_LOAD
        )
    except load_errors() as exc:
        raise UserError(
            f"onnxruntime cannot load {path} ({first_line(exc)}): re-run the export or optimize that wrote it"
        ) from None
    return checked_provider(session, wanted)


def load_errors() -> tuple[type[Exception], ...]:
    """ORT's errors for a model file it cannot parse or check (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("InvalidProtobuf", "InvalidArgument", "InvalidGraph", "NoSuchFile", "Fail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def checked_provider(session: Any, wanted: list[str]) -> Any:
    """The session, if it runs on the provider asked for; ORT drops a provider that fails to start
    (no cuDNN, a CUDA mismatch) with a log line and carries on with the next one."""
    got = session.get_providers()
    if got[0] != wanted[0]:
        raise UserError(
            f"onnxruntime could not start {wanted[0]} and fell back to {got[0]} (check the CUDA, cuDNN "
            "and TensorRT libraries it needs, see its log above), or use --provider cpu"
        )
    session.disable_fallback()  # a later failure in run() must raise, not move to the next provider
    return session
