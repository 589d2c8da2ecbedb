"""The report evaluator's renderer: a report context (the documented dict below) to a self-contained HTML file
and a Markdown summary. `trtkit.evaluation.write_report` and the recipe run reach it through the `report`
evaluator's `write_report` capability; matplotlib loads only when a plot is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_report(path: str | os.PathLike[str], context: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write a self-contained HTML report at `path` and a Markdown summary next to it (same name, `.md`).

    Returns (html_path, markdown_path). Every key of `context` is optional; sections without data are left out:

    - "title": str.
    - "models": list of {"name": str, "path": str, "role": str}            (e.g. role "reference"/"candidate").
    - "graph": {label: stats} with stats as returned by `trtkit.evaluation.graph_stats(path)`: nodes, initializers, parameters,
      size_bytes, opset, ops {op_type: count}, inputs/outputs [{"name", "dtype", "shape"}].
    - "passes": list of str, or of {"name": str, "options": dict, "detail": str}.
    - "calibration": {"method": str, "num_samples": int, "scales": {tensor: scale}} (amax = 127 * scale).
    - "accuracy": the `data` of the accuracy evaluator: {"reference", "candidate", "mode", "num_samples",
      "outputs": {output: {"cosine", "sqnr_db", "max_abs", "mean_abs", "max_rel", "mean_rel", "p99_abs"...}},
      "task": {...}, "checks": [{"output", "metric", "limit", "value", "passed"}], "passed": bool}.
      A list of such dicts (one per candidate) is accepted too.
    - "speed": the `data` of the speed evaluator: {"models": [{"model", "latency": {"median_ms", "mean_ms",
      "p90_ms", "p95_ms", "p99_ms", "min_ms", "max_ms", "cov"}, "throughput_qps", "samples_per_s",
      "speedup", "mode", "unstable"}]}.
    - "layers": the `data` of the layers evaluator: {"tensors": [{"tensor", "node", "op", "sqnr_db",
      "cosine"}] in graph order, "sensitivity": [{"node", "sqnr_db"}], "search": {"exclude": [...], ...}}.
      A list of such dicts (one per candidate) is accepted too: the last one is shown.
    - "histograms": {tensor: {"edges": [float] (len n+1), "counts": [int] (len n), "threshold": float,
      "method": str}} - activation |x| histograms with the chosen clipping threshold (amax).
    - "tables": extra tables, list of {"title": str, "columns": [str], "rows": [[cell]]}.
    - "notes": list of str.
    - "verdict": {"passed": bool, "sentence": str, "columns": [str], "rows": [[cell]]}: shown first (the recipe
      run fills it from its gates, builds, accuracy and speed results: `trtkit.pipeline.verdict`).

    The output is deterministic (no timestamps; PNG metadata stripped).
    """
    from trtkit.fileio import write_text

    target = Path(path)
    markdown_path = target.with_suffix(".md") if target.suffix.lower() in (".html", ".htm") else Path(
        str(target) + ".md")
    sections = _report_sections(context)
    title = str(context.get("title") or "trtkit report")
    write_text(target, _render_html(title, sections))
    write_text(markdown_path, _render_markdown(title, sections))
    return target, markdown_path


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if value is None:
        return ""
    return str(value)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"kind": "table", "title": title, "columns": columns, "rows": [[_fmt(c) for c in row] for row in rows]}


def _image(title: str, png: bytes) -> dict[str, Any]:
    return {"kind": "image", "title": title, "png": png}


def _report_sections(context: Mapping[str, Any]) -> list[dict[str, Any]]:
    sections: list[dict[str, Any]] = []
    verdict = context.get("verdict")
    if verdict:  # first thing on the page: pass/fail, precision per artefact, headline metric and speed-up
        sections.append({"kind": "notes", "title": "Verdict", "items": [str(verdict["sentence"])]})
        if verdict.get("rows"):
            sections.append(_table("Artefacts", list(verdict["columns"]), [list(r) for r in verdict["rows"]]))
    if context.get("models"):
        sections.append(_table("Models", ["name", "role", "path"],
                               [[m.get("name", ""), m.get("role", ""), m.get("path", "")] for m in context["models"]]))
    for label, stats in (context.get("graph") or {}).items():
        rows = [[key, stats.get(key)] for key in ("nodes", "initializers", "parameters", "size_bytes", "opset")
                if key in stats]
        rows += [[f"op {op}", count] for op, count in (stats.get("ops") or {}).items()]
        rows += [[f"input {t['name']}", f"{t.get('dtype', '')} {t.get('shape', '')}"] for t in stats.get("inputs", [])]
        rows += [[f"output {t['name']}", f"{t.get('dtype', '')} {t.get('shape', '')}"]
                 for t in stats.get("outputs", [])]
        sections.append(_table(f"Graph: {label}", ["property", "value"], rows))
    if context.get("passes"):
        rows = []
        for item in context["passes"]:
            if isinstance(item, Mapping):
                rows.append([item.get("name", ""), json.dumps(item.get("options", {}), sort_keys=True),
                             item.get("detail", "")])
            else:
                rows.append([str(item), "", ""])
        sections.append(_table("Passes applied", ["pass", "options", "detail"], rows))
    calibration = context.get("calibration")
    if calibration:
        head = [["method", calibration.get("method", "")], ["samples", calibration.get("num_samples", "")]]
        sections.append(_table("Calibration", ["property", "value"], head))
        scales = calibration.get("scales") or {}
        if scales:
            sections.append(_table("Calibration scales", ["tensor", "scale", "amax"],
                                   [[t, float(s), 127.0 * float(s)] for t, s in scales.items()]))
    checked = context.get("quantization_checked")
    if checked:
        sections.extend(_checked_sections(checked))
    accuracy = context.get("accuracy")
    for data in ([accuracy] if isinstance(accuracy, Mapping) else list(accuracy or [])):
        sections.extend(_accuracy_sections(data))
    if context.get("speed"):
        sections.extend(_speed_sections(context["speed"]))
    if context.get("compression"):  # a recipe's [prune] / [distill]: every artefact against the dense FP32 one
        sections.extend(_compression_sections(context["compression"]))
    layers = context.get("layers")
    if isinstance(layers, list):
        layers = layers[-1] if layers else None
    if layers:
        sections.extend(_layer_sections(layers))
    if context.get("histograms"):
        sections.append(_image("Activation histograms with chosen thresholds", _histogram_png(context["histograms"])))
    for table in context.get("tables") or []:
        sections.append(_table(table.get("title", ""), list(table.get("columns", [])),
                               [list(r) for r in table.get("rows", [])]))
    if context.get("notes"):
        sections.append({"kind": "notes", "title": "Notes", "items": [str(n) for n in context["notes"]]})
    return sections


def _checked_sections(checked: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`quantize --data/--target` decisions (metadata["quantization"]["checked"]): each with what, why and the
    metric before and after, then the verdict."""
    metric = checked.get("metric", "")
    rows = [[d.get("action", ""), d.get("what", ""), d.get("why", ""), d.get("before"), d.get("after")]
            for d in checked.get("decisions") or []]
    refined = checked.get("refined_by") or metric
    title = (f"Quantization decisions ({metric} on {checked.get('samples', '')} samples; rounding and range "
             f"search on the {checked.get('check_samples', '')} held out from their fit"
             + ("" if refined == metric else f"; refinements by {refined}") + ")")
    sections = [_table(title, ["decision", "what", "why", "before", "after"], rows)]
    target = checked.get("target")
    floats = checked.get("float_nodes") or []
    verdict = (f"{metric} {_fmt(checked.get('measured'))} on {checked.get('samples', '')} samples" if not target else
               f"target {target}: {'met' if checked.get('met') else 'NOT met, blocked by ' + str(checked.get('blocking'))}"
               f"; measured {_fmt(checked.get('measured'))}; {len(floats)} layer(s) in float"
               + (f": {', '.join(floats)}" if floats else ""))
    sections.append({"kind": "notes", "title": "Quantization verdict", "items": [verdict]})
    return sections


_ACCURACY_COLUMNS = ("cosine", "sqnr_db", "max_abs", "mean_abs", "max_rel", "p99_abs")


def _accuracy_sections(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    title = f"Accuracy: {Path(str(data.get('candidate', 'candidate'))).name} vs " \
            f"{Path(str(data.get('reference', 'reference'))).name}"
    if data.get("mode"):
        title += f" ({data['mode']})"
    rows = [[name, *[metrics.get(c) for c in _ACCURACY_COLUMNS]] for name, metrics in (data.get("outputs") or {}).items()]
    sections = [_table(title, ["output", *_ACCURACY_COLUMNS], rows)]
    task = data.get("task") or {}
    if task:
        sections.append(_table("Task metrics", ["metric", "value"], [[k, v] for k, v in task.items()
                                                                     if not isinstance(v, (dict, list))]))
    checks = data.get("checks") or []
    if checks:
        sections.append(_table("Tolerance checks", ["output", "metric", "limit", "value", "result"],
                               [[c["output"], c["metric"], c["limit"], c["value"], "pass" if c["passed"] else "FAIL"]
                                for c in checks]))
    return sections


def _speed_sections(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for item in data.get("models", []):
        lat = item.get("latency", {})
        rows.append([Path(str(item.get("model", ""))).name, item.get("mode", ""), lat.get("median_ms"),
                     lat.get("mean_ms"), lat.get("p90_ms"), lat.get("p99_ms"), lat.get("cov"),
                     item.get("throughput_qps"), item.get("speedup")])
    columns = ["model", "mode", "median ms", "mean ms", "p90 ms", "p99 ms", "CoV", "qps", "speedup"]
    sections = [_table("Speed", columns, rows)]
    from .speed import cpu_int8_note  # why an INT8 model is slow on onnxruntime's CPU kernels, one line each

    speed_notes = [note for note in map(cpu_int8_note, data.get("models", [])) if note]
    speed_notes += [f"{Path(str(f['model'])).name} could not run: {f['error']}" for f in data.get("failed", [])]
    if speed_notes:
        sections.append({"kind": "notes", "title": "Speed notes", "items": speed_notes})
    if rows:
        sections.append(_image("Latency (median bars, p90-p99 whiskers; log scale)", _speed_png(data)))
    return sections


def _layer_sections(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    sections = []
    tensors = data.get("tensors") or []
    if tensors:
        sections.append(_image("Per-layer error (SQNR dB, graph order)", _layers_png(tensors)))
        worst = sorted(tensors, key=lambda t: _sort_key(t.get("sqnr_db")))[:15]
        sections.append(_table("Worst tensors", ["tensor", "node", "op", "SQNR dB", "cosine"],
                               [[t["tensor"], t.get("node", ""), t.get("op", ""), t.get("sqnr_db"), t.get("cosine")]
                                for t in worst]))
    sensitivity = data.get("sensitivity") or []
    if sensitivity:
        sections.append(_table(f"Sensitivity ({data.get('sensitivity_mode', '')})", ["node", "op", "output SQNR dB"],
                               [[s["node"], s.get("op", ""), s.get("sqnr_db")] for s in sensitivity]))
    search = data.get("search") or {}
    if search:
        sections.append(_table("Mixed-precision search", ["property", "value"],
                               [[k, v] for k, v in search.items() if not isinstance(v, dict)]))
    return sections


def _sort_key(value: Any) -> float:
    return float("inf") if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    _figure().close(fig)
    return buffer.getvalue()


def _layers_png(tensors: list[Mapping[str, Any]]) -> bytes:
    plt = _figure()
    values = [min(_sort_key(t.get("sqnr_db")), 100.0) for t in tensors]
    labels = [str(t.get("node") or t["tensor"]) for t in tensors]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(values)), 3.6))
    colors = ["#c0392b" if v < 20 else "#e67e22" if v < 30 else "#27ae60" for v in values]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("SQNR (dB, capped at 100)")
    ax.axhline(20, color="#888", lw=0.8, ls="--")
    fig.tight_layout()
    return _png(fig)


def _speed_png(data: Mapping[str, Any]) -> bytes:
    import numpy as np

    plt = _figure()
    items = data.get("models", [])
    names = [Path(str(i.get("model", ""))).name for i in items]
    median = np.array([i["latency"]["median_ms"] for i in items])
    p90 = np.array([i["latency"]["p90_ms"] for i in items])
    p99 = np.array([i["latency"]["p99_ms"] for i in items])
    fig, ax = plt.subplots(figsize=(6.0, 0.6 * len(items) + 1.2))
    y = np.arange(len(items))
    ax.barh(y, median, color="#2980b9")
    ax.errorbar(p90, y, xerr=[np.zeros_like(p90), p99 - p90], fmt="|", color="k")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xscale("log")  # a p99 tail many times the median would otherwise flatten every bar
    ax.set_xlabel("latency (ms, log scale)")
    fig.tight_layout()
    return _png(fig)


def _compression_sections(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = list(data.get("rows", []))
    dense = rows[0] if rows else {}
    table = [[r["artefact"], r["macs"], r["params"], r["macs"] / dense["macs"] if dense.get("macs") else "",
              r["latency_ms"], r["latency_ms"] / dense["latency_ms"] if dense.get("latency_ms") else "",
              r.get("agreement", "")] for r in rows]
    columns = ["artefact", "MACs", "params", "MACs vs dense", "latency ms (ORT CPU, batch 1)", "latency vs dense",
               f"top-1 agreement with dense ({data.get('samples', 0)} samples)"]
    return [_table("Compression: FLOPs, parameters, latency and agreement", columns, table),
            _image("Compression trade-off", _compression_png(rows))]


def _compression_png(rows: list[Mapping[str, Any]]) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for row in rows:
        ax.scatter(row["latency_ms"], row.get("agreement", 1.0), s=30 + row["macs"] / max(1, rows[0]["macs"]) * 120)
        ax.annotate(row["artefact"], (row["latency_ms"], row.get("agreement", 1.0)), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("latency (ms, onnxruntime CPU, batch 1)")
    ax.set_ylabel("top-1 agreement with dense FP32")
    ax.set_title("marker size: MACs", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _histogram_png(histograms: Mapping[str, Mapping[str, Any]]) -> bytes:
    import numpy as np

    plt = _figure()
    names = list(histograms)[:12]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names, strict=False):
        item = histograms[name]
        edges = np.asarray(item["edges"], dtype=float)
        counts = np.asarray(item["counts"], dtype=float)
        ax.stairs(np.maximum(counts, 0.5), edges, fill=True, color="#7f8c8d")
        ax.set_yscale("log")
        if item.get("threshold") is not None:
            ax.axvline(float(item["threshold"]), color="#c0392b", lw=1.2,
                       label=f"{item.get('method', 'amax')} {float(item['threshold']):.3g}")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}h1{font-size:1.6em}
h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:.85em;text-align:left}th{background:#f3f3f3}
td.FAIL{color:#b00;font-weight:bold}img{max-width:100%;border:1px solid #eee}"""


def _render_html(title: str, sections: list[dict[str, Any]]) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section['title'])}</h2>")
        if section["kind"] == "table":
            parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in section["columns"])
                         + "</tr></thead><tbody>")
            for row in section["rows"]:
                cells = "".join(f"<td class=\"{'FAIL' if c == 'FAIL' else ''}\">{html.escape(c)}</td>" for c in row)
                parts.append(f"<tr>{cells}</tr>")
            parts.append("</tbody></table>")
        elif section["kind"] == "image":
            data = base64.b64encode(section["png"]).decode("ascii")
            parts.append(f"<img alt=\"{html.escape(section['title'])}\" src=\"data:image/png;base64,{data}\">")
        else:
            parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in section["items"]) + "</ul>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _render_markdown(title: str, sections: list[dict[str, Any]]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section['title']}", ""]
        if section["kind"] == "table":
            lines.append("| " + " | ".join(section["columns"]) + " |")
            lines.append("|" + "|".join("---" for _ in section["columns"]) + "|")
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in section["rows"]]
        elif section["kind"] == "image":
            lines.append("_(plot in the HTML report)_")
        else:
            lines += [f"- {item}" for item in section["items"]]
        lines.append("")
    return "\n".join(lines)
