"""The passes ``optimize`` runs, in order, and the one options object they read.

A pass is an ``onnx_ir`` in-place pass with a ``report`` (:class:`graph_passes.linears.StripReport`)
that says what it changed. It is registered as a :class:`PassSpec`: its name (used in the report
and in error messages) and how to build it from the manifest and the options. The optimize
driver wraps every registered pass in a checked pass (the checker and a run in ONNX Runtime as
its postcondition) and runs them through ``onnx_ir``'s ``PassManager``.

A new pass is one module with its pass class plus one :func:`register` call (or one entry in
``PASSES`` below, for a built-in one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from graph_passes.block_detect import parse_block
from graph_passes.block_pass import MODES as BLOCK_MODES
from graph_passes.block_pass import BlockSparsePass
from graph_passes.scatter_rows import MODES as SCATTER_MODES
from graph_passes.scatter_rows import ScatterRowsPass
from graph_passes.strip_heads import StripHeadsPass
from graph_passes.strip_rows import StripRowsPass
from mlpruning.core.manifest import Manifest


@dataclass(frozen=True)
class OptimizeOptions:
    """What a user chooses for optimize; validated on construction (ValueError names the field).

    ``num_heads``: head count for a folder with neither pruning.json nor config.json.
    ``scatter_rows``: auto (timed here), dense or scatter, for pruned output rows of O / FFN-out.
    ``block_sparse``: auto (timed here), dense or sparse, for block-pruned matrices.
    ``block``: auto, none, N or RxC: search the weights for all-zero blocks (see block_detect).
    ``ort_fusion``: try ONNX Runtime's transformer fusions, kept only if measured faster.
    """

    num_heads: int | None = None
    scatter_rows: str = "auto"
    block_sparse: str = "auto"
    block: str = "auto"
    ort_fusion: bool = False

    def __post_init__(self) -> None:
        if self.num_heads is not None and (not isinstance(self.num_heads, int) or self.num_heads < 1):
            raise ValueError(f"num_heads must be a positive whole number, got {self.num_heads!r}")
        if self.scatter_rows not in SCATTER_MODES:
            raise ValueError(
                f"scatter_rows must be one of {', '.join(SCATTER_MODES)}, got {self.scatter_rows!r}"
            )
        if self.block_sparse not in BLOCK_MODES:
            raise ValueError(
                f"block_sparse must be one of {', '.join(BLOCK_MODES)}, got {self.block_sparse!r}"
            )
        parse_block(self.block)


@dataclass(frozen=True)
class PassSpec:
    """One registered pass: its name and how to build it for a manifest and options."""

    name: str
    build: Callable[[dict[str, Any], OptimizeOptions], ir.passes.InPlacePass]


PASSES: list[PassSpec] = [
    PassSpec("strip_heads", lambda manifest, opts: StripHeadsPass(manifest)),
    PassSpec("strip_rows", lambda manifest, opts: StripRowsPass(manifest)),
    PassSpec(
        "block_sparse",
        lambda manifest, opts: BlockSparsePass(manifest, opts.block_sparse, search=parse_block(opts.block)),
    ),
    PassSpec("scatter_rows", lambda manifest, opts: ScatterRowsPass(manifest, opts.scatter_rows)),
]


def register(spec: PassSpec, before: str | None = None) -> None:
    """Add a pass, before the pass named ``before`` (at the end when None)."""
    if any(p.name == spec.name for p in PASSES):
        raise ValueError(f"a pass named {spec.name!r} is registered already")
    names = [p.name for p in PASSES]
    PASSES.insert(names.index(before) if before is not None else len(PASSES), spec)


def build_passes(manifest: Manifest, options: OptimizeOptions) -> list[tuple[str, Any]]:
    """(name, pass) for every registered pass, in order."""
    return [(spec.name, spec.build(manifest, options)) for spec in PASSES]
