"""A Triton Inference Server model repository from a run folder or a model folder.

Layout written (Triton's: config at the model level, the model file in a numbered version
folder; Triton ignores sub-folders whose names are not numbers, so the extras are safe there):

    REPO/<name>/config.pbtxt      platform, max_batch_size, inputs/outputs, dynamic batching,
                                  instance group
    REPO/<name>/1/model.onnx      (or model.plan for the tensorrt backend, from mlpruning build)
    REPO/<name>/tokenizer/        tokenizer files and config.json (labels): clients tokenize
    REPO/<name>/mlpruning.json    where it came from, the I/O signature, labels, notes

Names, element types and shapes come from the ONNX graph itself, never from a guess: every
input and output whose first dim is symbolic is batched, so Triton's ``dims`` drop it and
``max_batch_size`` bounds it; any other dim that is symbolic becomes -1 (the sequence axis).
A model with a fixed first dim is written with ``max_batch_size: 0`` and no dynamic batching.

Dynamic batching only merges requests of the same shape: clients that want batching pad to a
few fixed lengths (e.g. 128). ONNX Runtime in Triton runs BlockSparseLinear through its
model-local function (ORT >= 1.17 resolves the overloads); ``inline_functions`` writes the
inlined graph instead, for older Triton builds. Triton cannot switch off one ORT optimizer, so
the SkipLayerNormalization fusion that verify/bench disable at load may run there (it changes
speed on CPU, not results).

The config is checked against Triton's own protobuf schema (``ModelConfig`` from
``tritonclient[grpc]``) when that package is installed; ``parse_pbtxt`` reads the subset of the
text format written here, so the structure is checked without it too. Nothing under
``REPO/<name>`` is touched until the whole model folder is complete (staged, then renamed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.batcher import require_vocab
from deploy.engine_report import engine_source, profile_ranges
from deploy.run_layout import resolve_variant
from deploy.signature import TensorSpec, read_signature
from deploy.trt_engine import inline_functions
from mlpruning import __version__
from mlpruning.core.atomic import make_writable_dir
from mlpruning.core.contract import CONFIG_FILE, ONNX_FILE, PLAN_FILE, TOKENIZER_FILES
from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json

METADATA = "mlpruning.json"
BACKENDS = {"onnxruntime": ("onnxruntime_onnx", ONNX_FILE), "tensorrt": ("tensorrt_plan", PLAN_FILE)}
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
CLIENT_FILES = (*TOKENIZER_FILES, CONFIG_FILE)  # the tokenizer, and the label names
# ONNX TensorProto element type -> Triton data type
TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64"}
TRITON_TYPES |= {8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}


@dataclass(frozen=True)
class TritonOptions:
    backend: str = "onnxruntime"
    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16)
    max_queue_delay_us: int = 100
    instances: int = 1
    device: str | None = None  # None: cpu for onnxruntime, gpu for tensorrt
    inline_functions: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'")
        if self.device is not None and self.device not in KINDS:
            raise ValueError(f"device must be one of {', '.join(KINDS)}, got '{self.device}'")
        if self.backend == "tensorrt" and self.device == "cpu":
            raise ValueError("the tensorrt backend runs on GPUs only: use --device gpu")
        if self.backend == "tensorrt" and self.inline_functions:
            raise ValueError("--inline-functions is for the onnxruntime backend (an engine has no functions)")
        if not 0 <= self.max_batch_size <= 4096:
            raise ValueError(f"max_batch_size must be in [0, 4096], got {self.max_batch_size}")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= max(self.max_batch_size, 1)]
        if bad:
            raise ValueError(f"preferred batch sizes must be in [1, max_batch_size], got {bad}")
        if self.max_queue_delay_us < 0 or self.instances < 1:
            raise ValueError("max_queue_delay_us must be >= 0 and instances >= 1")

    @property
    def kind(self) -> str:
        return KINDS[self.device or ("gpu" if self.backend == "tensorrt" else "cpu")]


class Enum(str):
    """A bare identifier in protobuf text format (enum value), as opposed to a quoted string."""


def model_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], opts: TritonOptions) -> dict:
    """The config.pbtxt content as nested dicts/lists (``to_pbtxt`` writes it)."""
    batched = opts.max_batch_size > 0
    fixed = [t.name for t in inputs + outputs if not t.dims or t.dims[0] is not None]
    if batched and fixed:
        raise ValueError(f"{fixed[0]} has a fixed first dim, so it cannot be batched: use --max-batch-size 0")
    unknown = [t.name for t in inputs + outputs if t.elem_type not in TRITON_TYPES]
    if unknown:
        raise ValueError(f"{unknown[0]} has an element type Triton has no TYPE_ for")

    def tensor(t: TensorSpec) -> dict:
        dims = [-1 if d is None else d for d in (t.dims[1:] if batched else t.dims)]
        entry: dict[str, Any] = {"name": t.name, "data_type": Enum(TRITON_TYPES[t.elem_type])}
        # Triton needs at least one dim: a per-sequence scalar is [1], reshaped to [] for the model
        return entry | ({"dims": dims} if dims else {"dims": [1], "reshape": {"shape": []}})

    config: dict[str, Any] = {
        "name": name,
        "platform": BACKENDS[opts.backend][0],
        "max_batch_size": opts.max_batch_size,
        "input": [tensor(t) for t in inputs],
        "output": [tensor(t) for t in outputs],
    }
    if batched:
        config["dynamic_batching"] = {
            "preferred_batch_size": sorted(set(opts.preferred_batch_sizes)),
            "max_queue_delay_microseconds": opts.max_queue_delay_us,
        }
    config["instance_group"] = [{"count": opts.instances, "kind": Enum(opts.kind)}]
    return config


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid text-format string
    return str(value)


def to_pbtxt(message: dict, indent: int = 0) -> str:
    """Protobuf text format of nested dicts (messages), lists (repeated) and scalars."""
    pad, lines = "  " * indent, []
    for key, value in message.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            items = [f"{pad}  {{\n{to_pbtxt(v, indent + 2)}\n{pad}  }}" for v in value]
            lines += [f"{pad}{key} [", ",\n".join(items), f"{pad}]"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([A-Za-z_][\w.]*)|(-?\d+(?:\.\d+)?))')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"config.pbtxt: cannot read {text[pos : pos + 20]!r}")
        pos = match.end()
        if not match.group(1):  # a comment
            out.append(match.group(0).strip())
    return out


def parse_pbtxt(text: str) -> dict:
    """Read the text-format subset ``to_pbtxt`` writes back into the same nested structure."""
    tokens, pos = _tokens(text), 0

    def value() -> Any:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return message("}")
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                pos += tokens[pos] == ","
            pos += 1
            return items
        if tok.startswith('"'):
            return json.loads(tok)
        if tok in ("true", "false"):
            return tok == "true"
        return Enum(tok) if tok[0].isalpha() or tok[0] == "_" else (float(tok) if "." in tok else int(tok))

    def message(end: str | None) -> dict:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1 + (tokens[pos + 1] == ":")
            out[key] = value()
        pos += 1
        return out

    return message(None)


def schema_check(text: str) -> bool:
    """Parse ``text`` with Triton's ModelConfig schema; False when tritonclient is not installed."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient.grpc raises RuntimeError without its extra
        return False
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"config.pbtxt does not fit Triton's ModelConfig: {exc}") from None
    return True


def resolve_model_folder(source: Path, variant: str | None) -> tuple[Path, str | None]:
    """A model folder (model.onnx or model.plan in it) as is, or a run folder's variant folder."""
    return resolve_variant(source, variant, (ONNX_FILE, PLAN_FILE))


def _onnx_source(folder: Path) -> Path:
    """The ONNX model a folder's model.plan was built from (same folder unless build --out moved it)."""
    if (folder / ONNX_FILE).is_file():
        return folder / ONNX_FILE
    source = engine_source(folder)
    if not (source / ONNX_FILE).is_file():
        raise UserError(f"{folder} has no {ONNX_FILE} to read the inputs from: keep the engine next to it")
    return source / ONNX_FILE


def _engine_profile_check(folder: Path, opts: TritonOptions) -> None:
    ranges = profile_ranges(folder) if opts.backend == "tensorrt" else None
    if ranges is None:
        return
    max_batch = ranges["batch"][2]
    if opts.max_batch_size > max_batch:
        raise UserError(
            f"--max-batch-size {opts.max_batch_size} exceeds the engine's profile ({max_batch}): "
            f"rebuild with mlpruning build --batch 1,8,{opts.max_batch_size} or lower --max-batch-size"
        )


def _copy_model(folder: Path, dest: Path, opts: TritonOptions) -> int:
    """Model file (and any external-data files) into ``dest``; returns BlockSparseLinear functions seen."""
    import onnx

    if opts.backend == "tensorrt":
        shutil.copy2(folder / PLAN_FILE, dest / PLAN_FILE)
        return 0
    proto = onnx.load(str(folder / ONNX_FILE), load_external_data=opts.inline_functions)
    functions = len(proto.functions)
    if opts.inline_functions and functions:
        onnx.save(inline_functions(proto), str(dest / ONNX_FILE))
        return functions
    shutil.copy2(folder / ONNX_FILE, dest / ONNX_FILE)
    external = {
        entry.value
        for init in proto.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    for name in sorted(external):
        shutil.copy2(folder / name, dest / name)
    return functions


def _copy_client_files(source: Path, dest: Path) -> None:
    dest.mkdir()
    for file in CLIENT_FILES:
        if (source / file).is_file():
            shutil.copy2(source / file, dest / file)


def _metadata(
    folder: Path, client: Path, variant: str | None, config: dict, functions: int, opts: TritonOptions
) -> dict:
    hf = read_json(client / "config.json", "re-run mlpruning export") or {}
    export = read_json(client / "export.json", "re-run mlpruning export") or {}
    return {
        "format_version": 1,
        "tool_version": __version__,
        "source": str(folder),
        "variant": variant,
        "backend": opts.backend,
        "task": export.get("task"),
        "labels": hf.get("id2label"),
        "max_sequence_length": hf.get("max_position_embeddings"),
        "inputs": config["input"],
        "outputs": config["output"],
        "block_sparse_functions": functions,
        "inlined": opts.inline_functions and functions > 0,
        "tokenizer": "tokenizer/",
        "batching_note": "requests batch together only at equal shapes: pad to a few fixed lengths",
    }


def _install(staging: Path, final: Path, overwrite: bool) -> None:
    """Swap the staged model folder in; the old one (if any) is renamed away first, then removed."""
    if not final.exists():
        os.replace(staging, final)
        return
    if not overwrite:
        raise UserError(f"{final} exists: pass --overwrite to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=staging.parent))
    os.replace(final, old / final.name)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def export_triton(
    source: Path,
    repo: Path,
    opts: TritonOptions,
    name: str | None = None,
    variant: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``repo/<name>``; returns what was written and whether Triton's schema checked it."""
    folder, variant = resolve_model_folder(source, variant)
    model_file = BACKENDS[opts.backend][1]
    if not (folder / model_file).is_file():
        fix = "use --backend tensorrt" if model_file == ONNX_FILE else f"run mlpruning build {folder}"
        raise UserError(f"{folder} has no {model_file} for the {opts.backend} backend: {fix}")
    _engine_profile_check(folder, opts)
    default = f"{source.resolve().name}_{variant}" if variant else folder.resolve().name
    final = repo / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name or default).strip("._") or "model")
    if final.exists() and not overwrite:
        raise UserError(f"{final} exists: pass --overwrite to replace it")
    onnx_source = _onnx_source(folder)
    require_vocab(onnx_source.parent)  # clients tokenize with the files copied from there
    try:
        config = model_config(final.name, *read_signature(onnx_source), opts)
        text = to_pbtxt(config) + "\n"
        schema_checked = schema_check(text)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    make_writable_dir(repo)
    staging = Path(tempfile.mkdtemp(prefix=f".{repo.name}.{final.name}.", dir=repo.resolve().parent))
    try:
        (staging / "1").mkdir()
        functions = _copy_model(folder, staging / "1", opts)
        _copy_client_files(onnx_source.parent, staging / "tokenizer")
        metadata = _metadata(folder, onnx_source.parent, variant, config, functions, opts)
        (staging / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        (staging / "config.pbtxt").write_text(text, encoding="utf-8")
        _install(staging, final, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "model": str(final),
        "source": str(folder),
        "variant": variant,
        "config": str(final / "config.pbtxt"),
        "schema_checked": schema_checked,
        "max_batch_size": config["max_batch_size"],
        "inputs": [i["name"] for i in config["input"]],
        "outputs": [o["name"] for o in config["output"]],
    }
