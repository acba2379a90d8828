"""What `tapml test`, `tapml offload` and `tapml migrate` show and write: terminal text,
report.json and a self-contained report.html."""

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


def _chart(bars: list[tuple[str, float, str]], line: float | None = None) -> str:
    """Inline SVG: one bar per (label, value, status) on a log scale from 1e-9 to 1, and a
    dashed line at `line` (a tolerance)."""
    bar_h, label_w, width = 18, 330, 420

    def x(value: float) -> float:
        if not math.isfinite(value):
            return label_w + width
        return label_w + width * (min(max(math.log10(max(value, 1e-9)), -9), 0) + 9) / 9

    height = bar_h * len(bars)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 80}" '
             f'height="{height + 30}" font-family="monospace" font-size="12">']
    for exponent in range(-9, 1, 3):
        at = x(10.0**exponent)
        parts.append(f'<line x1="{at}" y1="0" x2="{at}" y2="{height}" stroke="#ddd"/>'
                     f'<text x="{at - 12}" y="{height + 20}">1e{exponent}</text>')
    for i, (label, value, status) in enumerate(bars):
        color = {"pass": "#3a7", "fail": "#d33", "error": "#999"}[status]
        length = 1.0 if value <= 0 else max(x(value) - label_w, 1.0)
        parts.append(f'<text x="0" y="{i * bar_h + 13}">{html.escape(label)}</text>'
                     f'<rect x="{label_w}" y="{i * bar_h + 3}" width="{length:.1f}" '
                     f'height="{bar_h - 6}" fill="{color}"><title>{value:.3g}</title></rect>')
    if line is not None:
        parts.append(f'<line x1="{x(line)}" y1="0" x2="{x(line)}" y2="{height}" '
                     'stroke="#d33" stroke-dasharray="4 3"/>')
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
    return f"""{_head(f"tapml test: {report.target}")}
<h1>{html.escape(s['model'])} ({s['quantization']}) on {html.escape(report.target)}</h1>
<p>{html.escape(summary(report)).replace(chr(10), '<br>')}</p>
<p>Suite {html.escape(s['path'])}: {s['calls']} calls of {s['kernels']} kernels carved on
{html.escape(s['source'])} from scenarios {html.escape(', '.join(s['scenarios']))}.
Device: {html.escape(report.device)}.</p>
<h2>Worst relative error per kernel</h2>
{_chart([(k['kernel'], k['max_rel'], k['status']) for k in data['kernels']])}
<h2>Kernels</h2><table><tr><th>kernel</th><th>status</th><th>calls</th><th>max abs</th>
<th>max rel</th><th>{html.escape(report.target)} ms</th><th>{html.escape(s['source'])} ms</th>
<th>message</th></tr>{rows}</table></body></html>
"""


STYLE = """body{font-family:sans-serif;margin:2em} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px} tr.fail{background:#fdd}
tr.error{background:#eee} td:nth-child(n+3){text-align:right}
pre{background:#f4f4f4;padding:1em;white-space:pre-wrap}"""


def _head(title: str) -> str:
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{STYLE}</style></head><body>")


# -- offload -----------------------------------------------------------------------------------
def offload_summary(report: dict) -> str:
    """What an offload found, in a few lines."""
    n, lines = len(report["kernels"]), []
    for step in report["steps"]:
        verdict = "match" if step["ok"] else "DIVERGES"
        lines.append(f"  {step['offloaded']:3d} of {n} kernels on {report['target']}: "
                     f"divergence {step['divergence']:.2e} ({verdict}, {step['seconds']:.1f} s)")
    head = (f"offload of {report['model']} to {report['target']} ({report['device']}), "
            f"{report['order']} order, tolerance {report['tolerance']:g}: {report['runs']} "
            f"evaluation runs (bound {report['run_bound']}; the all-source reference included)")
    if report["migrated"]:
        tail = f"all {n} kernels run on {report['target']} and match: migrated"
    elif report["culprit"] is None:
        tail = (f"every kernel it ran matches, but the {report['scenario']} scenario never runs "
                f"{', '.join(report['not_run'])}: evaluate one that runs every entry point "
                "(--scenario)")  # fmt: skip
    else:
        check = report.get("cross_check", {})
        tail = (f"the first diverging kernel is {report['culprit']}"
                + (f"\n  carved tests: {check['verdict']}" if check else ""))
    return "\n".join([head, *lines, tail])


def alone_summary(report: dict) -> str | None:
    """What the target made of the scenario alone once every kernel matched: the completion
    it generated, or how close its embeddings are to the source's; None before that."""
    if report.get("completion") is not None:
        return f"{report['target']} alone: {report['completion']!r}"
    e = report.get("embeddings")
    if e is None:
        return None
    return (f"{report['target']} alone: {e['texts']} texts embedded, cosine similarity to "
            f"{e['source']}'s embeddings >= {e['min_cosine']:.6f} (max |difference| "
            f"{e['max_abs']:.2e})")  # fmt: skip


def write_offload(report: dict, directory: Path) -> Path:
    directory = Path(directory)
    write_atomic(directory / "report.json", json.dumps(report, indent=1).encode())
    page = _head(f"tapml offload: {report['target']}") + _offload_html(report) + "</body></html>"
    write_atomic(directory / "report.html", page.encode())
    return directory / "report.html"


def _offload_html(report: dict) -> str:
    steps = [(f"{s['offloaded']} kernels on target", s["divergence"],
              "pass" if s["ok"] else "fail") for s in report["steps"]]  # fmt: skip
    rows = "".join(
        f"<tr class={'pass' if s['ok'] else 'fail'}><td>{s['offloaded']}</td>"
        f"<td>{html.escape(', '.join(s['added'][-3:]))}{' ...' if len(s['added']) > 3 else ''}"
        f"</td><td>{s['divergence']:.3g}</td><td>{'match' if s['ok'] else 'diverges'}</td>"
        f"<td>{s['seconds']:.1f}</td><td>{s['moves']}</td></tr>"
        for s in report["steps"]
    )
    summary = html.escape(offload_summary(report))
    alone = alone_summary(report)
    return (f"<h1>Offloading {html.escape(report['model'])} to {html.escape(report['target'])}"
            f"</h1><pre>{summary}</pre><h2>Divergence per step (dashed: tolerance)</h2>"
            f"{_chart(steps, report['tolerance'])}<table><tr><th>kernels offloaded</th>"
            "<th>last added</th><th>divergence</th><th>verdict</th><th>seconds</th>"
            f"<th>buffer moves</th></tr>{rows}</table>"
            + (f"<h2>On {html.escape(report['target'])} alone</h2><pre>{html.escape(alone)}</pre>"
               if alone is not None else ""))


# -- migrate -----------------------------------------------------------------------------------
def migration_summary(report: dict) -> str:
    t = report["test"]
    lines = [
        f"tests: {t['calls'] - t['failed_calls']} of {t['calls']} carved calls pass on "
        f"{report['target']} ({t['kernels'] - len(t['failed_kernels'])} of {t['kernels']} "
        "kernels)" + (f"; failing: {', '.join(t['failed_kernels'])}" if t["failed_kernels"]
                      else ""),
        offload_summary(report["offload"]),
        f"{report['model']} {'is' if report['migrated'] else 'is NOT'} migrated to "
        f"{report['target']} ({report['seconds']:.0f} s)",
    ]  # fmt: skip
    return "\n".join(lines)


def write_migration(report: dict, directory: Path) -> Path:
    directory = Path(directory)
    write_atomic(directory / "report.json", json.dumps(report, indent=1).encode())
    link = Path(report["test"]["report"]).relative_to(directory).as_posix()
    page = (_head(f"tapml migrate: {report['target']}")
            + f"<h1>Migrating {html.escape(report['model'])} to "
              f"{html.escape(report['target'])}</h1><pre>"
              f"{html.escape(migration_summary(report))}</pre><p>Carved tests: "
              f"<a href=\"{html.escape(link)}\">the per-kernel report</a>.</p>"
            + _offload_html(report["offload"]) + "</body></html>")  # fmt: skip
    write_atomic(directory / "report.html", page.encode())
    return directory / "report.html"
