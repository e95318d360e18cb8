"""Head and row masks applied to the weights themselves, through torch parametrizations.

transformers 5 has neither ``prune_heads`` nor a working ``head_mask``, so masking happens on
the parameters: each prunable ``nn.Linear`` gets a parametrization that returns
``W * rows[:, None] * cols[None, :]`` (and ``b * rows`` where the bias follows the rows). The
model's forward is untouched, any attention implementation works, and removing the
parametrizations bakes the zeros in, leaving plain Hugging Face keys.

Per layer there are four mask *units*, each with scores and one threshold:

    heads     [H]  -> rows of Q, K, V (each head is d consecutive rows) and O's input columns
    attn_out  [D]  -> O's output rows (hidden dimensions of the attention output)
    ffn_in    [I]  -> FFN-in rows (intermediate neurons) and FFN-out's input columns
    ffn_out   [D]  -> FFN-out's output rows

Q/K/V and FFN-in biases are masked with their rows (so pruned units are exactly zero); the biases
of O and FFN-out are kept: they feed the residual stream whatever rows survive, and deployment
adds them in full.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.adapters import Geometry, LayerLinears
from pipeline.pruning.binarizer import topk_mask

UNITS = ("heads", "attn_out", "ffn_in", "ffn_out")


def unit_sizes(geo: Geometry) -> dict[str, int]:
    return {"heads": geo.num_heads, "attn_out": geo.hidden, "ffn_in": geo.intermediate, "ffn_out": geo.hidden}


def full_shapes(geo: Geometry) -> dict[str, tuple[int, int]]:
    """Unpruned torch shape [out, in] of each prunable matrix of a layer."""
    attn = geo.num_heads * geo.head_dim
    return {
        "query": (attn, geo.hidden),
        "key": (attn, geo.hidden),
        "value": (attn, geo.hidden),
        "attn_out": (geo.hidden, attn),
        "ffn_in": (geo.intermediate, geo.hidden),
        "ffn_out": (geo.hidden, geo.intermediate),
    }


def mask_sizes(geo: Geometry) -> dict[str, int]:
    """Every mask of the model, keyed ``layer{i}_{unit}``, with its length."""
    return {_key(layer, u): n for layer in range(geo.num_layers) for u, n in unit_sizes(geo).items()}


class MaskScores(nn.Module):
    """Scores and thresholds of every mask unit in every layer (the only new parameters)."""

    def __init__(self, geo: Geometry, threshold_init: float = 10.0, score_init: float = 1.0) -> None:
        super().__init__()
        self.geo = geo
        sizes = mask_sizes(geo)
        self.scores = nn.ParameterDict(
            {k: nn.Parameter(torch.full((n,), score_init)) for k, n in sizes.items()}
        )
        self.thresholds = nn.ParameterDict({k: nn.Parameter(torch.tensor(threshold_init)) for k in sizes})
        self.fixed: dict[str, torch.Tensor] = {}

    def mask(self, layer: int, unit: str) -> torch.Tensor:
        """The hard 0/1 mask of one unit (differentiable to scores and threshold)."""
        key = _key(layer, unit)
        if key in self.fixed:
            return self.fixed[key]
        return topk_mask(self.scores[key], self.thresholds[key])

    def freeze(self) -> dict[str, torch.Tensor]:
        """Fix every mask at its current value (for evaluation and saving); returns CPU copies, for
        the bookkeeping and files that mix them with CPU tensors, while the forward keeps its own."""
        with torch.no_grad():
            self.fixed = {}
            self.fixed = {
                _key(layer, u): self.mask(layer, u).detach().clone()
                for layer in range(self.geo.num_layers)
                for u in UNITS
            }
        return {k: v.cpu() for k, v in self.fixed.items()}

    def unfreeze(self) -> None:
        self.fixed = {}


def _key(layer: int, unit: str) -> str:
    return f"layer{layer}_{unit}"


class _Masked(nn.Module):
    """Parametrization W -> W * rows[:, None] * cols[None, :] for one Linear weight."""

    def __init__(
        self, scores: MaskScores, layer: int, rows: str | None, cols: str | None, repeat: int
    ) -> None:
        super().__init__()
        self.scores_ref = [scores]  # a list, so the shared module is not registered as a child
        self.layer, self.rows, self.cols, self.repeat = layer, rows, cols, repeat

    def _vec(self, unit: str | None) -> torch.Tensor | None:
        if unit is None:
            return None
        m = self.scores_ref[0].mask(self.layer, unit)
        return m.repeat_interleave(self.repeat) if unit == "heads" else m

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols = self._vec(self.rows), self._vec(self.cols)
        if weight.dim() == 1:  # a bias follows the rows
            return weight * rows.to(weight.dtype)
        if rows is not None:
            weight = weight * rows.to(weight.dtype)[:, None]
        if cols is not None:
            weight = weight * cols.to(weight.dtype)[None, :]
        return weight


@dataclass(frozen=True)
class _Wiring:
    rows: str | None
    cols: str | None
    mask_bias: bool


WIRING = {
    "query": _Wiring("heads", None, True),
    "key": _Wiring("heads", None, True),
    "value": _Wiring("heads", None, True),
    "attn_out": _Wiring("attn_out", "heads", False),
    "ffn_in": _Wiring("ffn_in", None, True),
    "ffn_out": _Wiring("ffn_out", "ffn_in", False),
}


def attach(linears: list[LayerLinears], scores: MaskScores) -> None:
    """Register the mask parametrizations on every prunable Linear."""
    d = scores.geo.head_dim
    for layer, lin in enumerate(linears):
        for name, wiring in WIRING.items():
            module = getattr(lin, name)
            parametrize.register_parametrization(
                module, "weight", _Masked(scores, layer, wiring.rows, wiring.cols, d)
            )
            if wiring.mask_bias and module.bias is not None:
                parametrize.register_parametrization(
                    module, "bias", _Masked(scores, layer, wiring.rows, None, d)
                )


def detach_masks(linears: list[LayerLinears]) -> None:
    """Bake the masks into the weights and remove the parametrizations (plain HF keys again)."""
    for lin in linears:
        for name in WIRING:
            module = getattr(lin, name)
            for tensor in ("weight", "bias"):
                if parametrize.is_parametrized(module, tensor):
                    parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
