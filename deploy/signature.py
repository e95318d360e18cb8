"""The input and output signature of an ONNX model file (names, element types, dims).

Read by Triton's config writer and TensorRT's profile builder; torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpruning.core.errors import UserError


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``dims`` None where the ONNX dim is symbolic or unknown."""

    name: str
    elem_type: int
    dims: tuple[int | None, ...]


def signature(proto: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (initializers excluded: old exports list them as inputs) and outputs of a ModelProto."""
    weights = {init.name for init in proto.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        return TensorSpec(value.name, tensor.elem_type, dims)

    inputs = [spec(v) for v in proto.graph.input if v.name not in weights]
    return inputs, [spec(v) for v in proto.graph.output]


def read_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx
    from google.protobuf.message import DecodeError

    fix = "re-run the export or optimize that wrote it"
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError) as exc:
        raise UserError(f"{path} is not a readable ONNX model ({exc.__class__.__name__}): {fix}") from None
    if not proto.graph.input or not proto.graph.output:  # an empty file parses as an empty model
        raise UserError(f"{path} has no graph inputs or outputs: {fix}")
    return signature(proto)
