"""``mlpruning report RUN``: ``report.md`` and a self-contained ``report.html`` from ``summary.json``.

The report is built once as a list of blocks (heading, paragraph, table, image, list) and
rendered twice: Markdown (tables only; the pictures live in the HTML) and HTML with inline CSS
and every picture a base64 PNG data URI, so the single file can be mailed, attached to a CI run
or opened offline; it references no URL. Sections: overview per variant, accuracy vs latency
with the Pareto front, per-layer structure of each pruned variant, parity per stage, the
latency grid with speedups vs dense, how each INT8 copy was made (and the CPU's INT8
features), versions and hardware, and the stages that are missing.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy import report_plots as plots
from deploy import run_layout as layout
from deploy.summary import is_baseline, write_summary
from mlpruning.core.atomic import write_text


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    align_numbers: bool = True  # right-align numeric cells (HTML)


@dataclass(frozen=True)
class Image:
    png: bytes
    alt: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


Block = Heading | Para | Table | Image | Bullets


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def reference_point(summary: dict[str, Any]) -> str | None:
    """The latency point the overview and the Pareto plot use: 1x128 when every benched
    variant has it, else the first point they all share, else the first point anyone has."""
    grids = [
        [p["key"] for p in v["latency"]["points"]] for v in summary["variants"].values() if v.get("latency")
    ]
    if not grids:
        return None
    shared = [k for k in grids[0] if all(k in g for g in grids)]
    if "1x128" in shared:
        return "1x128"
    return shared[0] if shared else (grids[0][0] if grids[0] else None)


def _point(entry: dict[str, Any], key: str | None) -> dict[str, Any] | None:
    points = (entry.get("latency") or {}).get("points", [])
    return next((p for p in points if p["key"] == key), None)


def _parity_text(entry: dict[str, Any]) -> str:
    parity = entry.get("parity")
    return "missing" if parity is None else ("passed" if parity["passed"] else "FAILED")


def _overview(summary: dict[str, Any], key: str | None) -> list[Block]:
    name = summary.get("metric_name") or "metric"
    headers = ["variant", "model", f"{name} PyTorch", f"{name} ONNX", "remaining weights", "prunable params"]
    headers += ["parity", "agreement", "size MB", f"p50 ms {key or ''}".strip(), "speedup", "missing stages"]
    rows = []
    for variant, e in summary["variants"].items():
        params, parity = e.get("params"), e.get("parity") or {}
        point = _point(e, key) or {}
        agree = parity.get("identical_predictions")
        rows.append(
            [
                variant,
                e["model_dir"],
                _num(e["metric"]["pytorch"]),
                _num(e["metric"]["onnx"]),
                _num(e.get("remaining_ratio"), 3),
                f"{params['before'] / 1e6:.2f}M → {params['after'] / 1e6:.2f}M" if params else "-",
                _parity_text(e),
                "-" if agree is None else f"{agree}/{parity.get('examples')}",
                _num(e["size_bytes"] / 1e6, 1) if e.get("size_bytes") else "-",
                _num(point.get("p50_ms"), 2),
                f"{point['speedup']:.2f}x" if point.get("speedup") else "-",
                ", ".join(e["missing"]) or "none",
            ]
        )
    return [Heading(2, "Overview"), Table(headers, rows)]


def _colors(summary: dict[str, Any]) -> dict[str, str]:
    baseline = next((v for v in summary["variants"] if is_baseline(summary, v)), None)
    return plots.variant_colors(list(summary["variants"]), baseline)


def _pareto(summary: dict[str, Any], key: str | None, with_plots: bool) -> list[Block]:
    points = []
    for variant, e in summary["variants"].items():
        point, value = _point(e, key), e["metric"]["value"]
        if point and point.get("p50_ms") and value is not None:
            ratio = e.get("remaining_ratio")
            label = f"{point.get('speedup') or 1:.2f}x" + (
                f", {ratio:.0%} weights" if ratio is not None else ""
            )
            if e.get("parity") and not e["parity"]["passed"]:
                label += "\nparity FAILED"
            points.append(plots.ParetoPoint(variant, point["p50_ms"], value, label))
    blocks: list[Block] = [Heading(2, "Accuracy vs latency")]
    if not points:
        return [*blocks, Para("No variant has both a dev metric and a latency: run verify and bench first.")]
    front = ", ".join(p.name for p in plots.pareto_front(points))
    blocks.append(Para(f"p50 latency at batch x sequence {key}; on the Pareto front: {front}."))
    if with_plots:
        metric = summary.get("metric_name") or "metric"
        png = plots.pareto_png(points, metric, key or "?x?", _colors(summary))
        blocks.append(Image(png, "accuracy vs latency"))
    return blocks


def _structure_table(structure: dict[str, Any]) -> Table:
    layers = structure["layers"]
    blocks = bool(layers) and "blocks" in layers[0]
    headers = ["layer", "heads", "O rows", "FFN rows", "FFN-out rows"]
    if blocks:
        headers += [f"{m} blocks" for m in layers[0]["blocks"]]
    rows = []
    for r in layers:
        row = [str(r["layer"])] + [
            f"{r[f'{k}_kept']}/{r[f'{k}_total']}"
            for k in ("heads", "attn_out_rows", "ffn_rows", "ffn_out_rows")
        ]
        if blocks:
            row += [f"{k / max(n, 1):.0%}" for k, n in r["blocks"].values()]
        rows.append(row)
    return Table(headers, rows)


def _structure(summary: dict[str, Any], with_plots: bool) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Structure per layer")]
    entries = summary["variants"].items()
    pruned = [(v, e["structure"]) for v, e in entries if e.get("structure") and not e.get("int8_of")]
    if not pruned:
        return [*blocks, Para("No pruned checkpoint in this run.")]
    for variant, structure in pruned:
        blocks.append(
            Heading(3, f"{variant}: remaining encoder weights {_num(structure.get('remaining_ratio'), 3)}")
        )
        if with_plots and structure.get("layers"):
            blocks.append(Image(plots.structure_png(structure), f"{variant} structure heat map"))
        blocks.append(_structure_table(structure))
    return blocks


def _parity(summary: dict[str, Any]) -> list[Block]:
    headers = ["variant", "stage", "max abs", "p99 abs", "max rel", "failing / elements", "result"]
    rows, tolerance = [], None
    for variant, e in summary["variants"].items():
        parity = e.get("parity")
        if parity is None:
            rows.append([variant, "-", "-", "-", "-", "-", "missing (no verify report)"])
            continue
        tolerance = tolerance or parity.get("tolerance")
        for s in parity["stages"]:
            failing = f"{s.get('failing_elements')} / {s.get('elements')}"
            # an INT8 stage's element error is information: agreement and the metric decide
            result = "ok" if s.get("passed") else ("FAIL" if s.get("gating", True) else "info (INT8)")
            rows.append(
                [
                    variant,
                    s["stage"],
                    _sci(s.get("max_abs")),
                    _sci(s.get("p99_abs")),
                    _sci(s.get("max_rel")),
                    failing,
                    result,
                ]
            )
        agree = f"{parity.get('identical_predictions')} / {parity.get('examples')}"
        rows.append(
            [
                variant,
                f"dev predictions agreeing ({parity.get('agreement_rule') or 'same class'})",
                "-",
                "-",
                "-",
                agree,
                "ok" if parity.get("metric_passed") else "FAIL",
            ]
        )
    blocks: list[Block] = [Heading(2, "Parity with PyTorch"), Table(headers, rows)]
    if tolerance:
        atol, rtol = tolerance.get("atol"), tolerance.get("rtol")
        text = f"An element fails where |diff| > atol = {atol} and |diff| > rtol = {rtol} x |PyTorch|."
        blocks.append(Para(text))
    return blocks


def _latency(summary: dict[str, Any], with_plots: bool) -> list[Block]:
    headers = ["variant", "batch x seq", "p50 ms", "p90 ms", "p99 ms", "dense p50 ms", "speedup vs dense"]
    rows, speedups, notes = [], {}, []
    for variant, e in summary["variants"].items():
        latency = e.get("latency")
        if latency is None:
            rows.append([variant, "-", "-", "-", "-", "-", "missing (no bench report)"])
            continue
        notes.append(f"{variant}: {latency['source']}")
        for p in latency["points"]:
            speed = f"{p['speedup']:.2f}x" if p.get("speedup") else "-"
            rows.append(
                [
                    variant,
                    p["key"],
                    *(_num(p.get(k), 2) for k in ("p50_ms", "p90_ms", "p99_ms", "dense_p50_ms")),
                    speed,
                ]
            )
            if not is_baseline(summary, variant) and p.get("speedup"):
                speedups.setdefault(variant, {})[p["key"]] = p["speedup"]
    blocks: list[Block] = [Heading(2, "Latency (ONNX Runtime)")]
    if with_plots and speedups:
        blocks.append(Image(plots.speedup_png(speedups, _colors(summary)), "speedup vs dense"))
    blocks.append(Table(headers, rows))
    blocks.append(
        Para(
            "Speedup is the median of per-round ratios from interleaved rounds against the dense model "
            "(stable under machine load); milliseconds of different reports were taken at different times. "
            "Sources: " + "; ".join(notes) + "."
        )
    )
    return blocks


def _int8(summary: dict[str, Any]) -> list[Block]:
    made = {v: e["quantization"] for v, e in summary["variants"].items() if e.get("quantization")}
    if not made:
        return []
    headers = ["variant", "mode", "weights", "kept fp32", "embedding tables", "candidates measured"]
    rows = [
        [
            variant,
            q["mode"] + (" symmetric int8 (TensorRT)" if q.get("symmetric") else ""),
            "per channel" if q["per_channel"] else "per tensor",
            ", ".join(q["keep_fp32"] or []) or "nothing",
            "int8" if q.get("int8_embeddings") else "fp32",
            str(q["candidates"]),
        ]
        for variant, q in made.items()
    ]
    cpu = next((q["cpu"] for q in made.values() if q.get("cpu")), None) or {}
    vnni = {True: "yes", False: "no"}.get(cpu.get("vnni"), "unknown")
    return [
        Heading(2, "INT8 copies"),
        Table(headers, rows, align_numbers=False),
        Para(
            f"Chosen by measurement on {cpu.get('cpu', 'this CPU')}: INT8 flags "
            f"{', '.join(cpu.get('flags') or []) or 'none found'}; VNNI {vnni}. Details: "
            "quant/<variant>/quantize.json."
        ),
    ]


def _environment(summary: dict[str, Any]) -> list[Block]:
    env = summary.get("environment") or {}
    versions = summary.get("versions", {})
    later = summary.get("versions_read_at_report_time") or []
    rows = [[k, f"{v} (read at report time)" if k in later else str(v)] for k, v in versions.items()]
    # hardware and providers, whatever the bench recorded (tensorrt, baseline_provider, ...)
    for key, value in env.items():
        if key not in versions and key != "source" and value is not None:
            rows.append([key.replace("_", " "), str(value)])
    if env.get("source"):
        rows.append(["hardware from", str(env["source"])])
    if not env:
        rows.append(["hardware", "unknown (no bench report)"])
    return [Heading(2, "Versions and hardware"), Table(["item", "value"], rows, align_numbers=False)]


def _missing(summary: dict[str, Any]) -> list[Block]:
    items = [f"{v}: {', '.join(e['missing'])}" for v, e in summary["variants"].items() if e["missing"]]
    failed = summary.get("failed_stages") or {}
    items += [f"{stage} failed: {reason}" for stage, reason in failed.items()]
    absent = [v for v in summary.get("absent_variants", []) if not any(s.endswith(f":{v}") for s in failed)]
    items += [f"{v}: no stage output (not part of this run)" for v in absent]
    return [Heading(2, "Missing stages"), Bullets(items)] if items else []


def build_blocks(summary: dict[str, Any], with_plots: bool = True) -> list[Block]:
    key = reference_point(summary)
    head = [
        Heading(1, f"mlpruning report: {summary.get('run')}"),
        Para(
            f"Task {summary.get('task')}, dev-set {summary.get('metric_name')}; "
            f"mlpruning {summary.get('tool_version')}."
        ),
    ]
    return [
        *head,
        *_overview(summary, key),
        *_pareto(summary, key, with_plots),
        *_structure(summary, with_plots),
        *_parity(summary),
        *_latency(summary, with_plots),
        *_int8(summary),
        *_environment(summary),
        *_missing(summary),
    ]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_md(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Image):
            out.append(f"*Picture: {b.alt} (in {layout.REPORT_HTML}).*")
        else:
            lines = [
                "| " + " | ".join(_md_cell(h) for h in b.headers) + " |",
                "|" + " --- |" * len(b.headers),
            ]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; padding: 0 1em; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 9px; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
td.fail { color: #b00020; font-weight: bold; } td.ok { color: #1b7f1b; }
img { max-width: 100%; display: block; margin: .8em 0; }
p { line-height: 1.45; }
"""


# numbers, ratios, percentages, counts like "0 / 128" or "10.64M → 5.51M": right-aligned
NUMERIC = re.compile(r"^-$|^[-+]?[\d.,]+(e[-+]?\d+)?(x|%|M)?( [→/] [\d.,]+M?)?$")


def _html_cell(text: str, align_numbers: bool) -> str:
    cls = "fail" if text.startswith(("FAIL", "missing")) else ("ok" if text in ("ok", "passed") else "")
    cls = cls or ("num" if align_numbers and NUMERIC.match(text) else "")
    return f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"


def render_html(blocks: list[Block]) -> str:
    title = next((b.text for b in blocks if isinstance(b, Heading)), "mlpruning report")
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{html.escape(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f'<img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">')
        else:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            rows = "".join(
                "<tr>" + "".join(_html_cell(c, b.align_numbers) for c in row) + "</tr>" for row in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_report(run: Path) -> dict[str, Path]:
    """Refresh ``summary.json``, then write ``report.md`` and ``report.html`` (atomically)."""
    summary = write_summary(run)
    blocks = build_blocks(summary)
    paths = {
        "summary": run / layout.SUMMARY,
        "markdown": run / layout.REPORT_MD,
        "html": run / layout.REPORT_HTML,
    }
    write_text(paths["markdown"], render_md(blocks))
    write_text(paths["html"], render_html(blocks))
    return paths
