"""What `tapml test` shows and writes: a terminal table, report.json and report.html."""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict
from pathlib import Path

from tapml.fileio import write_atomic

from .replay import Report

FORMAT, VERSION = "tapml-test-report", 1


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def table(report: Report) -> str:
    """One line per kernel: status, calls, worst errors, target and source milliseconds."""
    rows = [("kernel", "status", "calls", "max abs err", "max rel err", f"{report.target} ms",
             f"{report.suite['source']} ms")]  # fmt: skip
    for k in report.kernels():
        rows.append((k["kernel"], k["status"].upper(), str(k["calls"]), f"{k['max_abs']:.2e}",
                     f"{k['max_rel']:.2e}", _ms(k["seconds"]), _ms(k["source_seconds"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def summary(report: Report) -> str:
    kernels = report.kernels()
    bad = [k["kernel"] for k in kernels if k["status"] != "pass"]
    mode = "bit-exact (the source platform)" if report.exact else "within per-dtype tolerances"
    line = (f"{report.target} on {report.device}: {len(report.calls) - len(report.failed)} of "
            f"{len(report.calls)} calls and {len(kernels) - len(bad)} of {len(kernels)} kernels "
            f"match the source {mode}")  # fmt: skip
    if bad:
        line += f"\nfailing kernels: {', '.join(bad)}"
        for k in kernels:
            for message in k["messages"][:1]:
                line += f"\n  {k['kernel']}: {message.splitlines()[0]}"
    return line


def to_dict(report: Report) -> dict:
    return {"format": FORMAT, "version": VERSION, "suite": report.suite, "target": report.target,
            "device": report.device, "exact": report.exact, "passed": not report.failed,
            "kernels": report.kernels(), "calls": [asdict(c) for c in report.calls]}  # fmt: skip


def write(report: Report, directory: Path) -> tuple[Path, Path]:
    """report.json and a self-contained report.html in `directory`."""
    directory = Path(directory)
    data = to_dict(report)
    json_path, html_path = directory / "report.json", directory / "report.html"
    write_atomic(json_path, json.dumps(data, indent=1).encode())
    write_atomic(html_path, _html(report, data).encode())
    return json_path, html_path


def _chart(kernels: list[dict]) -> str:
    """An inline SVG bar per kernel: its worst relative error on a log scale (1e-9 .. 1)."""
    bar_h, label_w, width = 18, 330, 420
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 80}" '
             f'height="{bar_h * len(kernels) + 30}" font-family="monospace" font-size="12">']
    for exponent in range(-9, 1, 3):
        x = label_w + width * (exponent + 9) / 9
        parts.append(f'<line x1="{x}" y1="0" x2="{x}" y2="{bar_h * len(kernels)}" '
                     f'stroke="#ddd"/><text x="{x - 12}" y="{bar_h * len(kernels) + 20}">'
                     f"1e{exponent}</text>")
    for i, k in enumerate(kernels):
        rel = k["max_rel"]
        frac = 0.0 if rel <= 0 else min(1.0, (math.log10(max(rel, 1e-9)) + 9) / 9)
        if not math.isfinite(rel):
            frac = 1.0
        color = {"pass": "#3a7", "fail": "#d33", "error": "#999"}[k["status"]]
        y = i * bar_h
        parts.append(f'<text x="0" y="{y + 13}">{html.escape(k["kernel"])}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{max(frac * width, 1):.1f}" '
                     f'height="{bar_h - 6}" fill="{color}"><title>{rel:.3g}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def _html(report: Report, data: dict) -> str:
    rows = "".join(
        f"<tr class={k['status']}><td>{html.escape(k['kernel'])}</td><td>{k['status']}</td>"
        f"<td>{k['calls']}</td><td>{k['max_abs']:.3g}</td><td>{k['max_rel']:.3g}</td>"
        f"<td>{_ms(k['seconds'])}</td><td>{_ms(k['source_seconds'])}</td>"
        f"<td>{html.escape('; '.join(k['messages']))}</td></tr>"
        for k in data["kernels"]
    )
    s = report.suite
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tapml test: {html.escape(report.target)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}} tr.fail{{background:#fdd}}
tr.error{{background:#eee}} td:nth-child(n+3){{text-align:right}}</style></head><body>
<h1>{html.escape(s['model'])} ({s['quantization']}) on {html.escape(report.target)}</h1>
<p>{html.escape(summary(report)).replace(chr(10), '<br>')}</p>
<p>Suite {html.escape(s['path'])}: {s['calls']} calls of {s['kernels']} kernels carved on
{html.escape(s['source'])} from scenarios {html.escape(', '.join(s['scenarios']))}.
Device: {html.escape(report.device)}.</p>
<h2>Worst relative error per kernel</h2>{_chart(data['kernels'])}
<h2>Kernels</h2><table><tr><th>kernel</th><th>status</th><th>calls</th><th>max abs</th>
<th>max rel</th><th>{html.escape(report.target)} ms</th><th>{html.escape(s['source'])} ms</th>
<th>message</th></tr>{rows}</table></body></html>
"""
