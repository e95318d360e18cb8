"""The artifact contract between stages: file names, tokenizer files, the prunable linears, the
architecture families and a run's variants. One definition each; every stage imports them here.

Folders written by the pipeline (see ``docs/formats.md``):

- a checkpoint (``finetune``, ``prune``): an HF model folder plus ``eval.json``; a masked
  checkpoint adds ``masks.safetensors``, ``pruning.json`` (the manifest, :mod:`.manifest`) and,
  from step 1, ``scores.safetensors``;
- an export (``export``): ``model.onnx``, ``pruning.json``, ``export.json``, config and
  tokenizer files;
- an optimized folder (``optimize``): the same with the rewritten ``model.onnx`` and
  ``optimize.json``; an engine folder (``build``) adds ``model.plan`` and ``engine.json``.

Architecture families: MLPruning prunes six linears per encoder layer, the query, key and value
projections (one head mask), the attention output O, FFN-in and FFN-out. Hugging Face names
them per family; a family records the names once, relative to the base model, so a bare
encoder and any task head on top of it, and any ONNX graph of them, are read the same way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "pruning.json"
MASKS_FILE = "masks.safetensors"
SCORES_FILE = "scores.safetensors"
EVAL_FILE = "eval.json"
EXPORT_REPORT = "export.json"
OPTIMIZE_REPORT = "optimize.json"
QUANTIZE_REPORT = "quantize.json"  # marks an INT8 folder (quantize)
ENGINE_REPORT = "engine.json"

# what a model folder carries for its tokenizer to load (those present are copied from stage to
# stage): fast tokenizer, configs, WordPiece vocabulary, BPE vocabulary and merges (RoBERTa)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
# at least one of these holds the vocabulary itself (WordPiece, BPE, SentencePiece)
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")

LINEARS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
MAX_BLOCK_SIDE = 1024


def parse_block_shape(text: str | int) -> tuple[int, int] | None:
    """A block size as users write it, ``N`` or ``RxC``: (rows, columns) of the PyTorch weight
    W [out, in], each side in [1, MAX_BLOCK_SIDE]; None when ``text`` is not such a size."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+)\s*)?", str(text).lower())
    if not match:
        return None
    rows, cols = int(match[1]), int(match[2] or match[1])
    return (rows, cols) if 1 <= rows <= MAX_BLOCK_SIDE and 1 <= cols <= MAX_BLOCK_SIDE else None


@dataclass(frozen=True)
class Variant:
    """One model a run deploys. ``checkpoint``: the run-folder entry holding its PyTorch
    checkpoint (verify's reference). The ``baseline`` variant is the dense model: deployed from
    its export (``onnx/``), and the latency every other variant is measured against. A pruned
    variant is deployed from its optimized folder (``opt/``); an INT8 copy of a variant
    (``int8_of``: that variant's name) from its quantized folder (``quant/``)."""

    name: str
    checkpoint: str
    baseline: bool = False
    int8_of: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"variant name must be letters, digits, - or _, got {self.name!r}")
        if self.baseline and self.int8_of:
            raise ValueError(f"variant {self.name}: the baseline is the fp32 dense model, not an INT8 copy")

    @property
    def folder(self) -> str:
        """The run-folder entry its deployable model sits under (``<folder>/<name>``)."""
        return "onnx" if self.baseline else ("quant" if self.int8_of else "opt")

    def int8_copy(self) -> Variant:
        return Variant(f"{self.name}{INT8_SUFFIX}", self.checkpoint, int8_of=self.name)

    def to_json(self) -> dict[str, object]:
        return dict(asdict(self))


INT8_SUFFIX = "-int8"
# The variants of a run folder written before run.json listed its own (and of a run whose
# config has a step 2): the dense teacher, step 1 and step 2, in pipeline order.
DEFAULT_VARIANTS = (
    Variant("dense", "teacher", baseline=True),
    Variant("step1", "step1"),
    Variant("step2", "step2"),
)


@dataclass(frozen=True)
class Family:
    """Module paths of one encoder family, relative to the base model (``model.base_model``)."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    query: str
    key: str
    value: str
    attn_out: str
    ffn_in: str
    ffn_out: str

    def linear_paths(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in LINEARS}


_BERT_LIKE = dict(
    layers="encoder.layer",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
)

FAMILIES: list[Family] = [
    Family("bert", ("bert",), **_BERT_LIKE),
    Family("roberta", ("roberta", "xlm-roberta", "camembert"), **_BERT_LIKE),
    Family(
        "distilbert",
        ("distilbert",),
        layers="transformer.layer",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attn_out="attention.out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
    ),
]


def register_family(family: Family) -> None:
    """Add an encoder family (its module paths): PyTorch adapters and ONNX detection both read it."""
    taken = {t for f in FAMILIES for t in f.model_types}
    if family.family in {f.family for f in FAMILIES} or taken & set(family.model_types):
        raise ValueError(f"family {family.family!r} or one of its model types is registered already")
    FAMILIES.append(family)


@dataclass(frozen=True)
class Geometry:
    """Shapes of an encoder: read from the modules (pipeline) or the graph (graph_passes)."""

    num_layers: int
    num_heads: int
    head_dim: int
    hidden: int
    intermediate: int


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str | None) -> Family | None:
    """The family of an HF ``model_type``, or None."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)
