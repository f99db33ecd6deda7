"""The picture and the files of a chaos run: ``report.json``, ``chaos.html`` (one
self-contained page, inline SVG, Jepsen style) and the one-line summary per scenario.

Pure rendering: everything it draws is in the ``RunReport`` it is given.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from clients.chaos.constants import PLOT_DOTS_MAX, PROBLEMS_SHOWN_HTML, PROBLEMS_SHOWN_SUMMARY
from clients.chaos.model import FaultWindow, RunReport, ScenarioReport

# The colour of each fault's band in the charts.
_FAULT_COLORS = {"kill-owner": "#e4572e", "pause-owner": "#f3a712", "kill-coordinator": "#8e6c8a",
                 "kill-cassandra-node": "#29335c", "kill-region": "#a8201a",
                 "restart-etcd": "#669bbc", "failback": "#5c946e"}
# Chart geometry (px): width, height, and the margins left, right, top and bottom.
_W, _H, _ML, _MR, _MT, _MB = 960, 230, 64, 16, 22, 34


def _svg_frame(duration: float, windows: list[FaultWindow], y_label: str,
               y_ticks: list[tuple[float, str]], y_of) -> list[str]:
    pw, ph = _W - _ML - _MR, _H - _MT - _MB

    def x(t: float) -> float:
        return _ML + pw * max(0.0, min(t, duration)) / duration

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect x="{_ML}" y="{_MT}" width="{pw}" height="{ph}" fill="#fafafa" '
           f'stroke="#ccc"/>']
    for w in windows:
        end = w.end_s if w.end_s is not None else w.start_s + 0.5
        color = _FAULT_COLORS.get(w.fault, "#999")
        out.append(f'<rect x="{x(w.start_s):.1f}" y="{_MT}" '
                   f'width="{max(2.0, x(end) - x(w.start_s)):.1f}" height="{ph}" '
                   f'fill="{color}" fill-opacity="0.18"><title>{html.escape(w.fault)} '
                   f'{html.escape(w.target)} {w.start_s:.1f}-{end:.1f} s</title></rect>')
        out.append(f'<text x="{x(w.start_s) + 3:.1f}" y="{_MT + 12}" fill="{color}">'
                   f'{html.escape(w.fault)} {html.escape(w.target)}</text>')
        served = w.notes.get("served_again_s")
        if served is not None:
            xs = x(w.start_s + served)
            out.append(f'<line x1="{xs:.1f}" y1="{_MT}" x2="{xs:.1f}" y2="{_MT + ph}" '
                       f'stroke="{color}" stroke-dasharray="4 3"><title>served again '
                       f'{served:.2f} s after the fault</title></line>')
    for value, label in y_ticks:
        y = y_of(value)
        out.append(f'<line x1="{_ML}" y1="{y:.1f}" x2="{_ML + pw}" y2="{y:.1f}" stroke="#e6e6e6"/>'
                   f'<text x="{_ML - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    step = max(1, int(math.ceil(duration / 12 / 5.0)) * 5)
    for t in range(0, int(duration) + 1, step):
        out.append(f'<text x="{x(t):.1f}" y="{_MT + ph + 14}" text-anchor="middle">{t}</text>')
    out.append(f'<text x="{_ML + pw / 2}" y="{_H - 4}" text-anchor="middle">seconds since '
               f'the workload started</text>')
    out.append(f'<text x="12" y="{_MT + ph / 2}" transform="rotate(-90 12 {_MT + ph / 2})" '
               f'text-anchor="middle">{html.escape(y_label)}</text>')
    return out


def throughput_svg(report: ScenarioReport, series: dict | None = None,
                   label: str = "acknowledged transfers / s") -> str:
    """Acknowledged and refused transfers per second: the bank's, or another ``series``
    (the load's) on the same time axis."""
    s = series if series is not None else report.series
    duration = max(1.0, float(max(report.series.get("seconds") or 1, s.get("seconds") or 1)))
    # Per-region lines: acknowledged transfers per second by the region that committed them
    # (the debit shard's owner when answered), bank and load together; they may rise above
    # the bars, which count the bank only.
    lines = s.get("by_region") or {}
    peak = max([*s.get("ok", []), *s.get("refused", []), 1,
                *(v for counts in lines.values() for v in counts)])
    top = _nice(peak)
    ph, pw = _H - _MT - _MB, _W - _ML - _MR

    def y(v: float) -> float:
        return _MT + ph - ph * v / top

    out = _svg_frame(duration, report.windows, label,
                     [(top * i / 4, f"{top * i / 4:g}") for i in range(5)], y)
    bw = pw / duration
    for sec, (ok, ref) in enumerate(zip(s["ok"], s["refused"])):
        x0 = _ML + sec * bw
        if ok:
            out.append(f'<rect x="{x0 + 0.5:.1f}" y="{y(ok):.1f}" width="{max(1.0, bw - 1):.1f}" '
                       f'height="{y(0) - y(ok):.1f}" fill="#2a9d8f"><title>{sec}-{sec + 1} s: '
                       f'{ok} ok, {ref} refused</title></rect>')
        if ref:
            out.append(f'<rect x="{x0 + 0.5:.1f}" y="{y(ok + ref):.1f}" '
                       f'width="{max(1.0, bw - 1):.1f}" height="{y(ok) - y(ok + ref):.1f}" '
                       f'fill="#bbb"/>')
    for sec, n in enumerate(s["unknown"]):
        if n:
            out.append(f'<text x="{_ML + (sec + 0.5) * bw:.1f}" y="{_MT + 24}" fill="#d00" '
                       f'text-anchor="middle">?{n}</text>')
    legend = [("#2a9d8f", "acknowledged (ok)"), ("#bbb", "refused"),
              ("#d00", "?n unanswered during the run")]
    for i, (region, counts) in enumerate(sorted(lines.items())):
        color = _REGION_COLORS[i % len(_REGION_COLORS)]
        points = " ".join(f"{_ML + (sec + 0.5) * bw:.1f},{y(n):.1f}"
                          for sec, n in enumerate(counts))
        out.append(f'<polyline class="region" points="{points}" fill="none" stroke="{color}" '
                   f'stroke-width="1.5"><title>{html.escape(region)}: acknowledged / s by '
                   f'committing region</title></polyline>')
        legend.append((color, f"region {region}"))
    out.append(_legend(legend))
    out.append("</svg>")
    return "\n".join(out)


# Line colors of the regions in the throughput picture, in region name order.
_REGION_COLORS = ("#e76f51", "#264653", "#8e44ad", "#f4a261", "#1d3557")


def latency_svg(report: ScenarioReport) -> str:
    """Latency on a log scale: every request a dot, p50 and p99 per second as lines."""
    s = report.series
    duration = max(1.0, float(s.get("seconds") or 1))
    ops = report.ops_plot
    lats = [(f - st) * 1000 for st, f, r in ops if r != "unknown" and f > 0]
    lo, hi = 1.0, _nice(max([*lats, 10.0]), log=True)
    ph = _H - _MT - _MB
    span = math.log10(hi) - math.log10(lo)

    def y(v: float) -> float:
        v = max(lo, min(hi, v))
        return _MT + ph - ph * (math.log10(v) - math.log10(lo)) / span

    ticks = [(10 ** k, _ms_label(10 ** k)) for k in range(0, int(math.log10(hi)) + 1)]
    out = _svg_frame(duration, report.windows, "latency (ms, log)", ticks, y)
    pw = _W - _ML - _MR

    def x(t: float) -> float:
        return _ML + pw * max(0.0, min(t, duration)) / duration

    # Every request as a dot (Jepsen style), thinned deterministically above PLOT_DOTS_MAX.
    step = max(1, len(ops) // PLOT_DOTS_MAX)
    for st, f, r in ops[::step]:
        if r == "unknown" or f <= 0:
            out.append(f'<circle cx="{x(st):.1f}" cy="{_MT + 3}" r="2" fill="#d00"/>')
        else:
            color = "#7fb8da" if r == "ok" else "#bbb"
            out.append(f'<circle cx="{x(f):.1f}" cy="{y((f - st) * 1000):.1f}" r="1.2" '
                       f'fill="{color}"/>')
    for key, color in (("p50_ms", "#1f77b4"), ("p99_ms", "#ff7f0e")):
        # One line per run of seconds with answers: a second without any is a gap.
        runs: list[list[str]] = [[]]
        for sec, v in enumerate(s[key]):
            if v is None:
                runs.append([])
            else:
                runs[-1].append(f"{x(sec + 0.5):.1f},{y(v):.1f}")
        for points in runs:
            if len(points) == 1:
                cx, cy = points[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            elif points:
                out.append(f'<polyline points="{" ".join(points)}" fill="none" '
                           f'stroke="{color}" stroke-width="1.8"/>')
    out.append(_legend([("#1f77b4", "p50 per second"), ("#ff7f0e", "p99 per second"),
                        ("#7fb8da", "one acknowledged request"), ("#bbb", "one refusal"),
                        ("#d00", "unanswered during the run")]))
    out.append("</svg>")
    return "\n".join(out)


def _legend(items: list[tuple[str, str]]) -> str:
    parts: list[str] = []
    x: float = _ML + 4
    for color, label in items:
        parts.append(f'<rect x="{x}" y="{_MT - 14}" width="10" height="8" fill="{color}"/>'
                     f'<text x="{x + 13}" y="{_MT - 6}">{html.escape(label)}</text>')
        x += 20 + 6.2 * len(label)
    return "".join(parts)


def _nice(value: float, log: bool = False) -> float:
    if log:
        return 10 ** math.ceil(math.log10(max(value, 1.0)))
    magnitude = 10 ** math.floor(math.log10(max(value, 1.0)))
    for m in (1, 2, 2.5, 5, 10):
        if m * magnitude >= value:
            return m * magnitude
    return 10 * magnitude


def _ms_label(ms: float) -> str:
    return f"{ms / 1000:g} s" if ms >= 1000 else f"{ms:g} ms"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_html(run: RunReport) -> str:
    """The whole run as one self-contained HTML page: a summary table, then per scenario
    its charts, its fault windows and its measured figures and problems."""
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>ledger-chaos</title>",
             "<style>body{font-family:sans-serif;margin:20px;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;"
             "padding:3px 8px;text-align:left}.PASS{color:#fff;background:#2a9d8f}"
             ".FAIL{color:#fff;background:#c0392b}.v{padding:2px 8px;border-radius:3px}"
             "pre{background:#f5f5f5;padding:6px;font-size:12px;white-space:pre-wrap}</style>"
             "</head><body>",
             f"<h1>ledger-chaos {html.escape(run.started_at)}</h1>",
             f"<p>commit {html.escape(run.git_commit)}; commit path: journal CAS at "
             f"<b>{html.escape(run.commit_path['journal_cas_serial_consistency'])}</b>, commit "
             f"at <b>{html.escape(run.commit_path['commit_consistency'])}</b>, reads at "
             f"{html.escape(run.commit_path['read_consistency'])}. Shaded bands are fault "
             f"windows (from the fault to its heal); a dashed line marks when every shard of "
             f"the failed owner answered again through another node.</p>",
             "<table><tr><th>scenario</th><th>verdict</th><th>ok</th><th>refused</th>"
             "<th>unknown (run / final)</th><th>failover s</th><th>load ok (ok/s)</th>"
             "<th>load acked in fault</th><th>lost</th><th>longest gap s (load / bank)</th>"
             "<th>reconcile</th></tr>"]
    for s in run.scenarios:
        fo = (s.measured.get("failover_s") or {}).get("max")
        faults = [w for w in s.windows if w.fault != "failback"]
        load = s.load or {}
        load_cell = (f"{load['counts']['ok']} ({load['ok_per_s']})" if load.get("counts")
                     else "-")
        in_fault = (", ".join(str(w.notes.get("load_acked", "-")) for w in faults)
                    if load else "-")
        gaps = ", ".join(f"{_fmt(w.notes.get('load_ack_gap_max_s'))} / "
                         f"{_fmt(w.notes.get('ack_gap_max_s'))}" for w in faults) or "-"
        parts.append(
            f"<tr><td><a href='#{s.name}'>{s.name}</a></td><td><span class='v {s.verdict}'>"
            f"{s.verdict}</span></td><td>{s.counts_final.get('ok', '-')}</td>"
            f"<td>{s.counts_final.get('refused', '-')}</td>"
            f"<td>{s.counts_run.get('unknown', '-')} / {s.counts_final.get('unknown', '-')}</td>"
            f"<td>{'-' if fo is None else f'{fo:.2f}'}</td><td>{load_cell}</td>"
            f"<td>{in_fault}</td><td>{s.measured.get('lost', '-')}</td><td>{gaps}</td>"
            f"<td>{'clean' if s.reconcile.get('clean') else 'NOT clean'}</td></tr>")
    parts.append("</table>")
    for s in run.scenarios:
        parts.append(f"<h2 id='{s.name}'>{html.escape(s.name)} <span class='v {s.verdict}'>"
                     f"{s.verdict}</span></h2>")
        parts.append(throughput_svg(s))
        parts.append("<br>")
        if s.load.get("series"):
            parts.append(throughput_svg(s, s.load["series"],
                                        "load: acknowledged transfers / s"))
            parts.append("<br>")
        if s.envelope.get("series"):
            parts.append(throughput_svg(s, s.envelope["series"], "acknowledged grabs / s"))
            parts.append("<br>")
        parts.append(latency_svg(s))
        rows = "".join(
            f"<tr><td>{html.escape(w.fault)}</td><td>{html.escape(w.target)}</td>"
            f"<td>{w.start_s:.2f}</td><td>{'-' if w.end_s is None else f'{w.end_s:.2f}'}</td>"
            f"<td>{html.escape(json.dumps({k: v for k, v in w.notes.items() if k not in ('owners_during_fault', 'epochs_before')}))}</td></tr>"
            for w in s.windows)
        parts.append("<table><tr><th>fault</th><th>target</th><th>start s</th><th>end s</th>"
                     f"<th>notes</th></tr>{rows}</table>")
        if s.load:
            figures = {k: v for k, v in s.load.items() if k != "series"}
            parts.append(f"<pre>load: {html.escape(json.dumps(figures))}</pre>")
        if s.envelope:
            figures = {k: v for k, v in s.envelope.items() if k != "series"}
            parts.append(f"<pre>hot envelope: {html.escape(json.dumps(figures))}</pre>")
        parts.append(f"<pre>measured: {html.escape(json.dumps(s.measured))}\n"
                     f"problems: {html.escape(json.dumps(s.problems[:PROBLEMS_SHOWN_HTML], indent=1))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run: RunReport) -> None:
    """Write ``report.json`` (atomically) and ``chaos.html`` into the run's ``out_dir``."""
    out = Path(run.config["out_dir"])
    run.report_path = out / "report.json"
    run.html_path = out / "chaos.html"
    doc = {"passed": run.passed, "started_at": run.started_at, "git_commit": run.git_commit,
           "commit_path": run.commit_path, "config": run.config,
           "scenarios": [s.to_json() for s in run.scenarios]}
    tmp = run.report_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(run.report_path)
    run.html_path.write_text(render_html(run))


def summary_line(s: ScenarioReport) -> str:
    """One line per scenario for the terminal (with up to a few problems below it)."""
    c = s.counts_final or {}
    parts = [f"{s.name:<20} {s.verdict}", f"ok={c.get('ok', 0)} refused={c.get('refused', 0)} "
             f"unknown={s.counts_run.get('unknown', 0)}->{c.get('unknown', 0)}"]
    for key in ("failover_s", "recovery_s", "all_served_after_heal_s"):
        m = s.measured.get(key)
        if m and m.get("max") is not None:
            parts.append(f"{key}={m['max']:.2f}")
    gaps = [w.notes.get("ack_gap_max_s") for w in s.windows]
    if gaps:
        parts.append("ack_gap_max_s=" + ",".join(f"{g:.1f}" for g in gaps if g is not None))
    if s.load.get("counts"):
        faults = [w for w in s.windows if w.fault != "failback"]
        parts.append(f"load ok={s.load['counts']['ok']} ({s.load['ok_per_s']}/s) "
                     f"acked_in_fault=" + ",".join(str(w.notes.get("load_acked"))
                                                   for w in faults)
                     + " load_gap_s=" + ",".join(_fmt(w.notes.get("load_ack_gap_max_s"))
                                                 for w in faults))
    if s.envelope.get("counts"):
        refund = s.evidence.get("hot-envelope", {}).get("refund", {})
        parts.append(f"grabs ok={s.envelope['counts']['ok']} "
                     f"({s.envelope.get('ok_per_s')}/s) in_fault="
                     + ",".join(str(w.notes.get("grabs_acked")) for w in s.windows
                                if w.fault != "failback")
                     + f" refunded={refund.get('refunded_minor', '-')}")
    parts.append(f"lost={s.measured.get('lost', '-')}")
    parts.append("reconcile=" + ("clean" if s.reconcile.get("clean") else "NOT-clean"))
    parts.append(f"{s.duration_s:.0f}s")
    text = "  ".join(parts)
    for problem in s.problems[:PROBLEMS_SHOWN_SUMMARY]:
        text += f"\n    problem: {problem}"
    return text


