"""Architecture adapters: where each encoder family keeps the matrices MLPruning prunes.

MLPruning works on six linears per encoder layer: the query, key and value projections (which
share one head mask), the attention output O, FFN-in (hidden -> intermediate) and FFN-out
(intermediate -> hidden). Hugging Face names them differently per family; an adapter records
the names once, relative to the *base model* (``model.base_model``), so one code path serves a
bare encoder and any task head on top of it.

Geometry is read from the real modules, never from a hard-coded model size: hidden size is
Q's ``in_features``, the intermediate size is FFN-in's ``out_features``, and the head count
comes from the config (the only place that states it), checked against the Q shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlpruning.errors import UserError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class ArchAdapter:
    """Module paths of one encoder family, relative to ``model.base_model``."""

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
        return {
            "query": self.query,
            "key": self.key,
            "value": self.value,
            "attn_out": self.attn_out,
            "ffn_in": self.ffn_in,
            "ffn_out": self.ffn_out,
        }


_BERT_LIKE = dict(
    layers="encoder.layer",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
)

ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter("bert", ("bert",), **_BERT_LIKE),
    ArchAdapter("roberta", ("roberta", "xlm-roberta", "camembert"), **_BERT_LIKE),
    ArchAdapter(
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
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config: PretrainedConfig) -> ArchAdapter:
    """The adapter for a config's ``model_type``, or a UserError listing supported ones."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UserError(
        f"model type '{model_type}' has no mlpruning adapter: use a BERT-family encoder "
        f"({', '.join(supported_model_types())})"
    )


@dataclass(frozen=True)
class LayerLinears:
    """The six prunable linears of one encoder layer."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    ffn_in: nn.Linear
    ffn_out: nn.Linear


@dataclass(frozen=True)
class Geometry:
    """Shapes of the encoder, read from the modules."""

    num_layers: int
    num_heads: int
    head_dim: int
    hidden: int
    intermediate: int


def layer_linears(model: PreTrainedModel) -> list[LayerLinears]:
    """The prunable linears of every layer, in order."""
    adapter = adapter_for(model.config)
    layers = model.base_model.get_submodule(adapter.layers)
    return [
        LayerLinears(**{name: layer.get_submodule(path) for name, path in adapter.linear_paths().items()})
        for layer in layers
    ]


def geometry(model: PreTrainedModel) -> Geometry:
    linears = layer_linears(model)
    first = linears[0]
    heads = int(model.config.num_attention_heads)
    hidden = first.query.in_features
    if first.query.out_features % heads:
        raise UserError(
            f"query width {first.query.out_features} is not divisible by {heads} heads: "
            "the model config's num_attention_heads does not match its weights"
        )
    return Geometry(
        num_layers=len(linears),
        num_heads=heads,
        head_dim=first.query.out_features // heads,
        hidden=hidden,
        intermediate=first.ffn_in.out_features,
    )
