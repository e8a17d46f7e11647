"""The running-perplexity plot: windowed ppl against position, one line per policy (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOG_SCALE_RATIO = 10.0  # log-scale y when the highest point is this many times the lowest


def plot_running_ppl(report: dict[str, Any], path: Path) -> Path:
    """Draw `report` (the JSON written by `eval ppl`) into a PNG file at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    values: list[float] = []
    for rec in report["policies"]:
        s = rec["series"]
        pts = [(p, v) for p, v in zip(s["position"], s["window_ppl"], strict=True) if v is not None]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        values.extend(ys)
        suffix = f" (stops at {rec['stopped_at']})" if rec.get("stopped_at") else ""
        ax.plot(xs, ys, label=f"{rec['label']}{suffix}", linewidth=1.4)
    trained = report["trained_context"]
    if report["tokens"] > trained:
        ax.axvline(trained, color="grey", linestyle="--", linewidth=1)
        ax.text(
            trained,
            1.0,
            f" trained context {trained}",
            transform=ax.get_xaxis_transform(),
            va="top",
            ha="left",
            fontsize=8,
            color="grey",
        )
    if values and min(values) > 0 and max(values) / min(values) > LOG_SCALE_RATIO:
        ax.set_yscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"perplexity (last {report['series_window']} tokens)")
    ax.set_title(f"{report['model']}: running perplexity on {Path(report['text']).name}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_accuracy_heatmap(report: dict[str, Any], label: str, path: Path) -> Path:
    """Accuracy of one policy run as a depth (rows) x length (columns) heatmap, each cell annotated (%)."""
    lengths, depths = report["lengths"], report["depths"]
    by_length = report["summary"][label]["by_length"]
    grid = [[by_length[str(n)]["by_depth"][f"{d:g}"] for n in lengths] for d in depths]
    task = report["task"] + ("" if report["task"] == "passkey" else f" {report['variant']}")
    return plot_grid(
        grid,
        [f"{d:g}" for d in depths],
        [str(n) for n in lengths],
        "needle depth",
        f"{task}: {label} (accuracy %)",
        path,
    )


def plot_grid(
    grid: list[list[float | None]],
    rows: list[str],
    columns: list[str],
    row_label: str,
    title: str,
    path: Path,
    column_label: str = "context length (tokens)",
) -> Path:
    """Scores in [0, 1] (None: no data) as a rows x columns heatmap in %, each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if v is None else 100 * v for v in row] for row in grid], dtype=float)
    width = 1.2 * len(columns) + 0.09 * max(len(r) for r in rows) + 2.0  # room for long row labels
    fig, ax = plt.subplots(figsize=(width, 0.6 * len(rows) + 1.8), dpi=110)
    im = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(column_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
