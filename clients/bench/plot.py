"""``ledger-bench --plot FILE``: throughput and latency over time, one column per workload.

Why matplotlib (Agg backend): it writes a PNG (or SVG) file without a display or a browser,
the picture is a plain file a README or an issue can show, and it is the most widely used
plotting library of Python. Plotly was the other choice: an interactive HTML page, but a
self-contained one embeds about 4 MB of JavaScript per file, and a PNG needs a headless
browser (kaleido). ``.html`` here is a small page with the SVG inline, for a browser tab.

It is an optional dependency (the ``bench`` extra, installed by ``make install``): the import
is inside ``write`` so that the bench runs without it when no plot is asked for.
"""

from __future__ import annotations

import io
from pathlib import Path

# Size of one workload's column (inches) and the resolution of a PNG (dots per inch).
PANEL_WIDTH_IN = 4.5
FIGURE_HEIGHT_IN = 6.0
PNG_DPI = 110


def write(path: str, series: dict[str, list[dict]], title: str,
          marks: dict[str, float] | None = None) -> None:
    """Draw ``series`` (workload -> rows of ``series.per_second``) into ``path``.

    The top row shows committed transfers (or grabs) per second (``per_s``), the bottom row
    the p50 and p99 latency of the calls that ended in that second. ``marks`` (workload ->
    seconds): a dashed line where every credit had landed (the envelope rows' credited_s).
    The format follows the file's suffix: .png, .svg, or .html (an SVG inside a page).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(series)
    fig, axes = plt.subplots(2, len(names), squeeze=False, sharex="col",
                             figsize=(PANEL_WIDTH_IN * len(names), FIGURE_HEIGHT_IN))
    for col, name in enumerate(names):
        rows = series[name]
        seconds = [r["second"] for r in rows]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(seconds, [r["per_s"] for r in rows], marker="o", color="tab:blue")
        top.set_title(name)
        if marks and name in marks:
            top.axvline(marks[name], color="tab:green", linestyle="--",
                        label=f"all credited {marks[name]:.2f} s")
            top.legend()
        top.set_ylabel("committed / s")
        top.set_ylim(bottom=0)
        top.grid(alpha=0.3)
        # A second in which no call ended has no latency: a gap in the line, not a zero.
        bottom.plot(seconds, [_or_nan(r["p50_ms"]) for r in rows], marker="o", label="p50")
        bottom.plot(seconds, [_or_nan(r["p99_ms"]) for r in rows], marker="o", label="p99")
        bottom.set_ylabel("call latency (ms)")
        bottom.set_xlabel("second of the workload")
        bottom.set_ylim(bottom=0)
        bottom.grid(alpha=0.3)
        bottom.legend()
    fig.suptitle(title)
    fig.tight_layout()
    suffix = Path(path).suffix.lower()
    if suffix == ".html":
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg")
        Path(path).write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'>"
                              f"<title>ledger-bench</title></head><body>\n"
                              f"{buffer.getvalue()}\n</body></html>\n")
    else:
        fig.savefig(path, dpi=PNG_DPI)
    plt.close(fig)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value
