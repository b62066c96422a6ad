"""PNG plots of benchmark rows (matplotlib, headless): speedup and accepted length against gamma,
per-position acceptance, and the per-round time split as stacked bars."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(rows: list[dict], folder: Path) -> list[Path]:
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    spec_rows = [r for r in rows if r["gamma"] is not None]
    modes = sorted({r["mode"] for r in spec_rows}, key=lambda m: [r["mode"] for r in rows].index(m))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^vP*X"
    width = 0.08 * (len(modes) - 1)  # modes that coincide stay visible: each is shifted a little along gamma
    for i, mode in enumerate(modes):
        shift = (i - (len(modes) - 1) / 2) * 0.08 if len(modes) > 1 else 0.0
        pts = sorted((r["gamma"], r.get("speedup_vs_target"), r.get("average_accepted_length"), r.get("predicted_speedup"))
                     for r in spec_rows if r["mode"] == mode)
        style = dict(marker=markers[i % len(markers)], markersize=5, label=mode)
        if all(p[1] is not None for p in pts):
            line, = ax1.plot([p[0] + shift for p in pts], [p[1] for p in pts], **style)
            if all(p[3] is not None for p in pts):  # the prediction beside the measurement, same colour
                ax1.plot([p[0] + shift for p in pts], [p[3] for p in pts], ls=":", marker="x", markersize=4,
                         color=line.get_color(), label=f"{mode} (predicted)")
        if all(p[2] is not None for p in pts):
            ax2.plot([p[0] + shift for p in pts], [p[2] for p in pts], **style)
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax1.set(xlabel="gamma", ylabel="tokens/s vs target-only", title="Speedup: measured (solid), predicted (dotted)")
    ax2.set(xlabel="gamma", ylabel="tokens per target call", title="Average accepted length")
    ax2.set_ylim(bottom=1.0)
    gammas = sorted({r["gamma"] for r in spec_rows})
    for ax in (ax1, ax2):
        ax.set_xticks(gammas)  # integer gammas only
        ax.set_xlim(min(gammas, default=0) - 0.5 - width, max(gammas, default=1) + 0.5 + width)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(folder / "speedup_and_accepted_length.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    with_pos = [r for r in spec_rows if r.get("accepted_per_position")]
    if with_pos:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in with_pos:
            ax.plot(range(1, len(r["accepted_per_position"]) + 1), [a or 0 for a in r["accepted_per_position"]],
                    marker=".", label=f"{r['mode']} g={r['gamma']}")
        ax.set(xlabel="draft position k", ylabel="P(token k accepted | drafted)", title="Per-position acceptance", ylim=(0, 1))
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(folder / "acceptance_per_position.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(with_pos)), 4))
        labels = [f"{r['mode'].replace('speculative', 'spec')}\ng={r['gamma']}" for r in with_pos]
        bottom = [0.0] * len(with_pos)
        for part in ("draft", "target", "fusion", "overhead"):
            values = [1000 * (r["round_time_split"][part] or 0) for r in with_pos]
            ax.bar(labels, values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set(ylabel="ms per round", title="Time per speculation round")
        ax.tick_params(axis="x", labelsize=6)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(folder / "round_time_split.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths
