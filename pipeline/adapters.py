"""Architecture adapters: the six prunable linears of a loaded PyTorch encoder, and its geometry.

Where each family keeps the query, key, value, attention output, FFN-in and FFN-out linears is
the families table of the artifact contract (:mod:`mlpruning.core.contract`), shared with the
torch-free graph passes; this module applies it to ``model.base_model``.

Geometry is read from the real modules, never from a hard-coded model size: hidden size is
Q's ``in_features``, the intermediate size is FFN-in's ``out_features``, and the head count
comes from the config (the only place that states it), checked against the Q shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlpruning.core.contract import Family, Geometry, family_for, supported_model_types
from mlpruning.core.errors import UserError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel


def adapter_for(config: PretrainedConfig) -> Family:
    """The family of a config's ``model_type``, or a UserError listing supported ones."""
    model_type = getattr(config, "model_type", None)
    family = family_for(model_type)
    if family is not None:
        return family
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
