"""Per-layer structure of a pruned model: a table, ``structure.json`` and a PNG heat map.

The heat map has two panels: which heads survive in each layer (a layers x heads grid), and the
kept fraction of each row unit per layer (heads, O rows, FFN rows, FFN-out rows), annotated
with the counts. After block pruning (step 2) a third panel shows, per layer and matrix, the
kept share of its live blocks. Drawn with matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlpruning.core.atomic import write_json
from mlpruning.core.manifest import Manifest

STRUCTURE_JSON = "structure.json"
STRUCTURE_PNG = "structure.png"


def structure(manifest: Manifest) -> dict[str, Any]:
    geo = manifest["geometry"]
    rows = []
    for i, layer in enumerate(manifest["layers"]):
        rows.append(
            {
                "layer": i,
                "heads_kept": layer["num_heads_kept"],
                "heads_total": geo["num_heads"],
                "head_indices": layer["heads_kept"],
                "attn_out_rows_kept": layer["attn_out_rows_kept"],
                "attn_out_rows_total": geo["hidden"],
                "ffn_rows_kept": layer["ffn_rows_kept"],
                "ffn_rows_total": geo["intermediate"],
                "ffn_out_rows_kept": layer["ffn_out_rows_kept"],
                "ffn_out_rows_total": geo["hidden"],
            }
        )
        if "blocks" in layer:
            rows[-1]["blocks"] = {m: [b["kept"], b["live"]] for m, b in layer["blocks"].items()}
    summary = {
        "remaining_ratio": manifest["remaining_ratio"],
        "target": manifest.get("target"),
        "layers": rows,
    }
    if manifest.get("step") == "block":
        summary["block"] = manifest.get("block")
        summary["remaining_ratio_of_step1"] = manifest.get("remaining_ratio_of_step1")
        summary["target_of"] = manifest.get("target_of")
    return summary


def _ratio_text(summary: dict[str, Any]) -> str:
    text = f"remaining encoder weights: {summary['remaining_ratio']:.4f}"
    if summary.get("remaining_ratio_of_step1") is None:
        return f"{text} (target {summary['target']})"
    of_step1 = summary["remaining_ratio_of_step1"]
    return f"{text}, {of_step1:.4f} of step 1 (target {summary['target']} of {summary['target_of']})"


def format_table(summary: dict[str, Any]) -> str:
    blocks = "blocks" in summary["layers"][0] if summary["layers"] else False
    head = f"{'layer':>5} {'heads':>7} {'O rows':>11} {'FFN rows':>11} {'FFN-out rows':>12}"
    lines = [head + ("  kept blocks Q K V O in out (%)" if blocks else "")]
    for r in summary["layers"]:
        line = (
            f"{r['layer']:>5} {r['heads_kept']:>3}/{r['heads_total']:<3} "
            f"{r['attn_out_rows_kept']:>5}/{r['attn_out_rows_total']:<5} "
            f"{r['ffn_rows_kept']:>5}/{r['ffn_rows_total']:<5} "
            f"{r['ffn_out_rows_kept']:>5}/{r['ffn_out_rows_total']:<6}"
        )
        if blocks:
            line += "  " + " ".join(f"{100 * k / max(n, 1):3.0f}" for k, n in r["blocks"].values())
        lines.append(line)
    lines.append(_ratio_text(summary))
    return "\n".join(lines)


def draw_heatmap(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = summary["layers"]
    n_heads = layers[0]["heads_total"]
    grid = np.zeros((len(layers), n_heads))
    for r in layers:
        grid[r["layer"], r["head_indices"]] = 1.0
    units = [
        ("heads", "heads"),
        ("O rows", "attn_out_rows"),
        ("FFN rows", "ffn_rows"),
        ("FFN-out", "ffn_out_rows"),
    ]
    frac = np.array([[r[f"{k}_kept"] / r[f"{k}_total"] for _, k in units] for r in layers])
    blocks = "blocks" in layers[0]
    width = 4 + 0.35 * n_heads + 4 + (4 if blocks else 0)
    fig, axes = plt.subplots(1, 3 if blocks else 2, figsize=(width, 1.2 + 0.45 * len(layers)))
    ax1, ax2 = axes[0], axes[1]
    ax1.imshow(grid, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    ax1.set(
        title="heads kept (dark = kept)",
        xlabel="head",
        ylabel="layer",
        xticks=range(n_heads),
        yticks=range(len(layers)),
    )
    im = ax2.imshow(frac, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax2.set(title="kept fraction per unit", xticks=range(len(units)), yticks=range(len(layers)))
    ax2.set_xticklabels([u for u, _ in units])
    for (i, j), v in np.ndenumerate(frac):
        kept = layers[i][f"{units[j][1]}_kept"]
        ax2.text(j, i, f"{kept}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    fig.colorbar(im, ax=ax2, fraction=0.046)
    if blocks:
        _block_panel(axes[2], layers)
    fig.suptitle(_ratio_text(summary))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _block_panel(ax: object, layers: list[dict[str, Any]]) -> None:
    """Kept share of the live blocks of every matrix (step 2)."""
    import numpy as np

    names = list(layers[0]["blocks"])
    share = np.array([[k / max(n, 1) for k, n in r["blocks"].values()] for r in layers])
    ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set(title="kept share of blocks", xticks=range(len(names)), yticks=range(len(layers)))
    ax.set_xticklabels(["Q", "K", "V", "O", "in", "out"][: len(names)])
    for (i, j), v in np.ndenumerate(share):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=7)


def write_summary(manifest: Manifest, folder: Path) -> dict[str, Any]:
    summary = structure(manifest)
    write_json(folder / STRUCTURE_JSON, summary)
    draw_heatmap(summary, folder / STRUCTURE_PNG)
    return summary
