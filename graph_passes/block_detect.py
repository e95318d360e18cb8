"""Block sparsity found in a weight's zeros, and the sparsity no kernel here can use.

A prunable linear's graph weight is W^T [in, out]. Cut into (bi, bo) blocks, block (i, j) is kept
when any entry of W^T[i*bi:(i+1)*bi, j*bo:(j+1)*bo] is nonzero; ``BlockSparseLinear`` skips all
other blocks exactly (their product is zero). For a block shape that divides the weight, its
*coverage* is the share of the zero entries that lie in all-zero blocks: how much of the
sparsity that shape can turn into skipped work. A block shape tiled by a smaller one is covered
at most as well (an all-zero 32x32 block is four all-zero 16x16 blocks), but larger blocks run
faster (fewer, longer GEMMs; see ``block_sparse_lowering``). So the search keeps the largest
candidate whose coverage is within ``COVERAGE_SLACK`` of the best candidate's.

Zeros outside the chosen blocks cannot be skipped by any kernel this project has on ONNX
Runtime. They are sorted by the first pattern they fit, so a user learns what another pruning
pattern, or another runtime, would buy:

- ``vector``: inside an all-zero aligned run of 4 along the input axis (4x1) or the output axis
  (1x4), what vector-wise pruning leaves; counted only when such runs hold at least 90% of the
  zeros left, since random zeros also fall into runs by chance;
- ``n_m``: when every aligned group of M weights along the input (reduction) axis holds at most
  N nonzeros, the zeros left (2:4 is what sparse tensor cores run, through TensorRT);
- ``unstructured``: the rest.

All shares are of the matrix's entries, so zeros = blocks + vector + n_m + unstructured.

Cost: one pass over the weight builds the nonzero map of the smallest candidate grid (16x16);
every candidate it tiles is pooled from that small map, so a BERT-base encoder (72 matrices,
85 M weights) is searched in about a second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mlpruning.core.contract import parse_block_shape

Block = tuple[int, int]  # (bi, bo): input features x output features of W^T

# largest first: on equal coverage the earlier (faster) shape wins
CANDIDATES: tuple[Block, ...] = ((64, 64), (32, 32), (32, 16), (16, 32), (16, 16))
COVERAGE_SLACK = 0.01
VECTOR = 4
PATTERN_HOLDS = 0.9  # share of the remaining zeros a vector pattern must hold to count as one
N_M = ((1, 4), (2, 8), (2, 4), (4, 8))  # strictest first
SEARCH_MODES = ("auto", "none")


def parse_block(text: str) -> str | Block:
    """``auto``, ``none``, or ``N`` / ``RxC`` (rows x columns of the PyTorch weight W) as (bi, bo)."""
    text = str(text).strip().lower()
    if text in SEARCH_MODES:
        return text
    shape = parse_block_shape(text)
    if shape is None:
        raise ValueError(f"--block {text}: use auto, none, N or RxC (rows x columns, e.g. 32 or 32x16)")
    rows, cols = shape
    return (cols, rows)  # W [out, in] rows are W^T's columns


def nonzero_blocks(nonzero: np.ndarray, block: Block) -> np.ndarray:
    """[in / bi, out / bo] map of blocks holding a nonzero entry (the kept-block mask)."""
    (n_in, n_out), (bi, bo) = nonzero.shape, block
    return nonzero.reshape(n_in // bi, bi, n_out // bo, bo).any(axis=(1, 3))


def divides(shape: tuple[int, ...], block: Block) -> bool:
    """Whether ``block`` tiles a weight of ``shape`` exactly."""
    return shape[0] % block[0] == 0 and shape[1] % block[1] == 0


def _pooled(base: np.ndarray, base_block: Block, block: Block) -> np.ndarray:
    """A coarser block map from a finer one (``block`` a multiple of ``base_block``)."""
    return nonzero_blocks(base, (block[0] // base_block[0], block[1] // base_block[1]))


def _maps(nonzero: np.ndarray, candidates: tuple[Block, ...]) -> dict[Block, np.ndarray]:
    """The kept-block map of every candidate that divides the weight."""
    fits = [b for b in candidates if divides(nonzero.shape, b)]
    maps: dict[Block, np.ndarray] = {}
    if not fits:
        return maps
    base = (min(b[0] for b in fits), min(b[1] for b in fits))
    tiled = divides(nonzero.shape, base) and all(b[0] % base[0] == 0 and b[1] % base[1] == 0 for b in fits)
    base_map = nonzero_blocks(nonzero, base) if tiled else None
    for b in fits:
        maps[b] = _pooled(base_map, base, b) if base_map is not None else nonzero_blocks(nonzero, b)
    return maps


def _in_zero_runs(zero: np.ndarray, axis: int) -> np.ndarray:
    """Entries inside an aligned all-zero run of ``VECTOR`` along ``axis`` (ragged tail excluded)."""
    out = np.zeros_like(zero)
    n = zero.shape[axis] // VECTOR * VECTOR
    if n == 0:
        return out
    part = zero[:n] if axis == 0 else zero[:, :n]
    if axis == 0:
        runs = part.reshape(n // VECTOR, VECTOR, -1).all(axis=1)
        out[:n] = np.repeat(runs, VECTOR, axis=0)
    else:
        runs = part.reshape(part.shape[0], n // VECTOR, VECTOR).all(axis=2)
        out[:, :n] = np.repeat(runs, VECTOR, axis=1)
    return out


def n_m_pattern(nonzero: np.ndarray) -> str | None:
    """The strictest N:M pattern every aligned group along the input axis keeps, if any."""
    for n, m in N_M:
        if nonzero.shape[0] % m:
            continue
        per_group = nonzero.reshape(nonzero.shape[0] // m, m, -1).sum(axis=1)
        if per_group.max() <= n:
            return f"{n}:{m}"
    return None


@dataclass(frozen=True)
class Sparsity:
    """What the zeros of one weight W^T [in, out] are made of."""

    shape: tuple[int, int]
    zeros: float  # share of entries that are zero
    block: Block | None = None  # (bi, bo) chosen, None when no candidate block is all zero
    block_density: float | None = None  # kept blocks / blocks of ``block``
    coverage: float = 0.0  # share of the zeros inside all-zero blocks of ``block``
    in_blocks: float = 0.0  # shares of all entries, by the first pattern they fit
    vector: float = 0.0
    vector_pattern: str | None = None  # "4x1" (along the input axis) or "1x4" (along the output)
    n_m: float = 0.0
    n_m_pattern: str | None = None
    unstructured: float = 0.0
    kept: np.ndarray | None = None  # the kept-block map of ``block``

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("kept")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}


def _vectors(zero: np.ndarray, rest: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The zeros of ``rest`` in aligned all-zero runs, when such runs hold most of them.

    Random zeros fall into runs by chance (half the entries zero puts 1/8 of the zeros in runs
    of 4), so runs count as a pattern only when they hold ``PATTERN_HOLDS`` of the zeros left.
    """
    best, name = np.zeros_like(rest), None
    for axis, label in ((0, "4x1"), (1, "1x4")):
        runs = rest & _in_zero_runs(zero, axis)
        if runs.sum() >= PATTERN_HOLDS * rest.sum() and runs.sum() > best.sum():
            best, name = runs, label
    return best, name


def _classify(zero: np.ndarray, covered: np.ndarray) -> dict[str, Any]:
    """Shares of all entries by pattern: blocks, vectors, N:M, unstructured."""
    size = zero.size
    rest = zero & ~covered
    vector, vector_pattern = _vectors(zero, rest) if rest.any() else (rest, None)
    rest &= ~vector
    pattern = n_m_pattern(~zero) if rest.any() else None
    n_m = int(rest.sum()) if pattern else 0
    return {
        "in_blocks": float(covered.sum() / size),
        "vector": float(vector.sum() / size),
        "vector_pattern": vector_pattern,
        "n_m": n_m / size,
        "n_m_pattern": pattern,
        "unstructured": float((rest.sum() - n_m) / size),
    }


def _choose(maps: dict[Block, np.ndarray], zeros: int) -> tuple[Block | None, float]:
    """The largest block shape covering within COVERAGE_SLACK of the best; (None, 0) if none covers."""
    coverage = {b: float((~m).sum()) * b[0] * b[1] / zeros for b, m in maps.items()}
    best = max(coverage.values(), default=0.0)
    if best <= 0:
        return None, 0.0
    chosen = next(b for b in maps if coverage[b] >= best - COVERAGE_SLACK)
    return chosen, coverage[chosen]


def detect(wt: np.ndarray, candidates: tuple[Block, ...] = CANDIDATES) -> Sparsity:
    """The block shape that best exploits ``wt``'s zeros, and what the other zeros are."""
    shape = (int(wt.shape[0]), int(wt.shape[1]))
    nonzero = wt != 0
    zeros = int(nonzero.size - np.count_nonzero(nonzero))
    if zeros == 0:
        return Sparsity(shape, 0.0)
    maps = _maps(nonzero, candidates)
    block, coverage = _choose(maps, zeros)
    covered = np.zeros_like(nonzero)
    if block is not None:
        covered = ~np.kron(maps[block], np.ones(block, dtype=bool))
    found = _classify(~nonzero, covered)
    if block is None:
        return Sparsity(shape, zeros / nonzero.size, **found)
    kept = maps[block]
    return Sparsity(shape, zeros / nonzero.size, block, float(kept.mean()), coverage, kept=kept, **found)
