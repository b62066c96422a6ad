"""PNG plots of benchmark rows (matplotlib, headless): speedup and accepted length against gamma,
per-position acceptance (one panel per mode), and the per-round time split as stacked bars.
Text is at least 8 pt, positions and gammas are integers, and legends sit outside the data."""

from __future__ import annotations

import math
from pathlib import Path

from .benchmark import tree_label

FONT = 9  # points: every label, tick and legend is at least 8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT + 1, "axes.labelsize": FONT,
                         "xtick.labelsize": FONT, "ytick.labelsize": FONT, "legend.fontsize": FONT})
    return plt


def _modes(rows: list[dict]) -> list[str]:
    order = [r["mode"] for r in rows]
    return sorted({r["mode"] for r in rows}, key=order.index)


def plot_all(rows: list[dict], folder: Path) -> list[Path]:
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    spec_rows = [r for r in rows if r["gamma"] is not None]
    paths = [_speedup(plt, spec_rows, folder)]
    with_pos = [r for r in spec_rows if r.get("accepted_per_position")]
    if with_pos:
        paths += [_per_position(plt, with_pos, folder), _round_split(plt, with_pos, folder)]
    with_cats = [r for r in spec_rows if r.get("by_category") and r["mode"].startswith("speculative")]
    if with_cats:
        paths.append(_categories(plt, with_cats, folder))
    return paths


def _categories(plt, rows: list[dict], folder: Path) -> Path:
    """Spec-Bench's view: each speculative row's speedup over the target per category, grouped bars."""
    categories = list(dict.fromkeys(c for r in rows for c in r["by_category"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(categories) + 3), 4.2))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        label = f"{r['mode']} " + (tree_label(r) or f"gamma {r['gamma']}")
        values = [(r["by_category"].get(c) or {}).get("speedup_vs_target") or 0.0 for c in categories]
        ax.bar([k + (i - (len(rows) - 1) / 2) * width for k in range(len(categories))], values, width, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
    ax.set_ylabel("speedup vs target alone")
    ax.set_title("Speedup per category")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path = folder / "speedup_by_category.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _speedup(plt, spec_rows: list[dict], folder: Path) -> Path:
    modes = _modes(spec_rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    markers = "osD^vP*X"
    step = 0.08
    width = step * (len(modes) - 1)  # modes that coincide stay visible: each is shifted a little along gamma
    for i, mode in enumerate(modes):
        shift = (i - (len(modes) - 1) / 2) * step if len(modes) > 1 else 0.0
        pts = sorted((r["gamma"], r.get("speedup_vs_target"), r.get("average_accepted_length"), r.get("predicted_speedup"))
                     for r in spec_rows if r["mode"] == mode)
        style = dict(marker=markers[i % len(markers)], markersize=5, label=mode)
        if all(p[1] is not None for p in pts):
            line, = ax1.plot([p[0] + shift for p in pts], [p[1] for p in pts], **style)
            if all(p[3] is not None for p in pts):  # the prediction beside the measurement, same colour
                ax1.plot([p[0] + shift for p in pts], [p[3] for p in pts], ls=":", marker="x", markersize=4,
                         color=line.get_color())
        if all(p[2] is not None for p in pts):
            ax2.plot([p[0] + shift for p in pts], [p[2] for p in pts], **style)
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax1.set(xlabel="gamma", ylabel="tokens/s vs target-only", title="Speedup: measured (solid), predicted (dotted x)")
    ax2.set(xlabel="gamma", ylabel="tokens per target call", title="Average accepted length")
    ax2.set_ylim(bottom=1.0)
    gammas = sorted({r["gamma"] for r in spec_rows})
    for ax in (ax1, ax2):
        ax.set_xticks(gammas)  # integer gammas only
        ax.set_xlim(min(gammas, default=0) - 0.5 - width, max(gammas, default=1) + 0.5 + width)
        ax.grid(alpha=0.3)
    by_label = {}  # every mode once (the HF rows have a speedup but no accepted length)
    for ax in (ax1, ax2):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    labels, handles = list(by_label), list(by_label.values())
    ncol = min(len(labels), 4) or 1
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)  # below the panels, off the data
    rows_of_legend = math.ceil(len(labels) / ncol) if labels else 0
    fig.tight_layout(rect=(0, 0.06 * rows_of_legend + 0.02, 1, 1))
    path = folder / "speedup_and_accepted_length.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _per_position(plt, with_pos: list[dict], folder: Path) -> Path:
    """One panel per mode (lines of one mode, one per gamma, rarely overlap much), integer positions."""
    modes = _modes(with_pos)
    cols = min(len(modes), 3)
    rows_n = math.ceil(len(modes) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n + 0.6), squeeze=False, sharey=True)
    longest = max(len(r["accepted_per_position"]) for r in with_pos)
    for ax, mode in zip(axes.flat, modes):
        for r in sorted((r for r in with_pos if r["mode"] == mode), key=lambda r: r["gamma"]):
            values = [a or 0 for a in r["accepted_per_position"]]
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=4, label=f"gamma {r['gamma']}")
        ax.set(title=mode, xlabel="draft position k", ylim=(0, 1.02))
        ax.set_xticks(range(1, longest + 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", frameon=False)
    for ax in axes[:, 0]:
        ax.set_ylabel("P(token k accepted | drafted)")
    for ax in list(axes.flat)[len(modes):]:
        ax.set_visible(False)
    fig.suptitle("Per-position acceptance")
    fig.tight_layout()
    path = folder / "acceptance_per_position.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _round_split(plt, with_pos: list[dict], folder: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6.5, 0.75 * len(with_pos) + 2.5), 4.6))
    labels = [f"{r['mode'].replace('speculative', 'spec')} " + (tree_label(r) or f"g={r['gamma']}") for r in with_pos]
    bottom = [0.0] * len(with_pos)
    for part in ("draft", "target", "fusion", "overhead"):
        values = [1000 * (r["round_time_split"][part] or 0) for r in with_pos]
        ax.bar(range(len(with_pos)), values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(with_pos)), labels, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="ms per round", title="Time per speculation round")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars
    fig.tight_layout()
    path = folder / "round_time_split.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
