"""PNG figures for the reproduction report: accuracy by strategy family, and generator samples.

matplotlib is imported on first use, so the rest of the project runs where it is not installed
(the report then goes without figures and says so).
"""
from __future__ import annotations

import io
from pathlib import Path

from common import atomic_write_bytes, compact_png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def available() -> bool:
    """Whether matplotlib can be imported here (the report says so when it cannot)."""
    try:
        _pyplot()
    except ImportError:
        return False
    return True


def _save(fig, path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, compact_png(buffer.getvalue()))


def family_bars(best_by_problem: dict[str, list[dict]], path: str | Path) -> None:
    """One panel per problem: the best rule of each family as a bar (mean, std over seeds as error
    bars), the oracle as a dashed line."""
    plt = _pyplot()
    problems = list(best_by_problem)
    heights = [len([b for b in best if b["family"] != "oracle (bound)"]) for best in best_by_problem.values()]
    fig, axes = plt.subplots(len(problems), 1, figsize=(7, 0.9 + 0.32 * sum(heights) + 0.6 * len(problems)),
                             gridspec_kw={"height_ratios": [max(h, 1) for h in heights]}, squeeze=False)
    for ax, problem in zip(axes[:, 0], problems):
        bars = [b for b in best_by_problem[problem] if b["family"] != "oracle (bound)"]
        oracle = next((b for b in best_by_problem[problem] if b["family"] == "oracle (bound)"), None)
        positions = range(len(bars))
        ax.barh(positions, [100 * b["mean"] for b in bars], xerr=[100 * b["std"] for b in bars],
                color="tab:blue", alpha=0.8, capsize=3)
        ax.set_yticks(list(positions), [b["family"] for b in bars])
        ax.invert_yaxis()
        if oracle is not None:
            ax.axvline(100 * oracle["mean"], color="black", linestyle="--", label=f"oracle {100 * oracle['mean']:.1f}")
            ax.legend(loc="lower right", fontsize=8)
        low = min([100 * b["mean"] for b in bars] + [100.0])
        ax.set_xlim(max(0.0, low - 10), 100)
        ax.set_title(problem, fontsize=10)
    axes[-1, 0].set_xlabel("accuracy on the combined test set (%), best rule of each family")
    _save(fig, path)
    plt.close(fig)


def sample_grid_figure(grids: list[tuple[str, str | Path]], path: str | Path) -> None:
    """The generators' sample grids (PNG files) side by side, each titled by its expert."""
    plt = _pyplot()
    columns = min(len(grids), 4)
    rows = -(-len(grids) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, grid) in zip(axes.ravel(), grids):
        ax.imshow(plt.imread(grid))
        ax.set_title(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)


def msp_figure(rows: list[dict], path: str | Path) -> None:
    """One panel per expert: its max-softmax distribution (histogram shares, mean over seeds) on real test
    images of its own domain, of the other domains, and on each synthesizer's images of it."""
    import numpy as np

    plt = _pyplot()
    experts = list(dict.fromkeys(r["expert"] for r in rows))
    synthesizers = list(dict.fromkeys(r["synthesizer"] for r in rows))
    fig, axes = plt.subplots(1, len(experts), figsize=(3.2 * len(experts), 2.8), squeeze=False, sharey=True)

    def mean_histogram(group: list[dict], key: str) -> np.ndarray:
        return np.mean([r["msp_histogram"][key] for r in group], axis=0)

    for ax, expert in zip(axes[0], experts):
        mine = [r for r in rows if r["expert"] == expert]
        bins = len(mine[0]["msp_histogram"]["real_in"])
        centres = (np.arange(bins) + 0.5) / bins
        ax.plot(centres, mean_histogram(mine, "real_in"), color="black", label="real, own domain")
        ax.plot(centres, mean_histogram(mine, "real_out"), color="grey", linestyle="--", label="real, other domains")
        for synthesizer in synthesizers:
            group = [r for r in mine if r["synthesizer"] == synthesizer]
            ax.plot(centres, mean_histogram(group, "synthetic"), label=f"synthetic ({synthesizer})")
        ax.set_title(expert, fontsize=9)
        ax.set_xlabel("max softmax")
    axes[0, 0].set_ylabel("share of images")
    axes[0, -1].legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def training_curves(panels: dict[str, dict[str, list[list[dict]]]], metrics: tuple[str, str], path: str | Path,
                    labels: tuple[str, str] = ("training loss", "training accuracy")) -> None:
    """Training curves of one stage: per panel row (e.g. a gate regime), per line (e.g. an expert or a gate type),
    the mean over its runs (seeds, experts) of each epoch's ``metrics[0]`` (left) and ``metrics[1]`` (right)."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 2, figsize=(9, 2.4 * len(panels) + 0.4), squeeze=False)
    for row, (panel, lines) in zip(axes, panels.items()):
        for name, histories in lines.items():
            epochs = min(len(h) for h in histories)
            for ax, metric in zip(row, metrics):
                values = np.mean([[entry[metric] for entry in h[:epochs]] for h in histories], axis=0)
                ax.plot(np.arange(1, epochs + 1), values, marker="." if epochs < 30 else None, label=name)
        for ax, label in zip(row, labels):
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
        row[0].set_title(panel, fontsize=9, loc="left")
        row[1].legend(fontsize=6, ncol=2 if len(lines) > 6 else 1)
    from matplotlib.ticker import MaxNLocator

    for ax in axes.ravel():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=8)
    _save(fig, path)
    plt.close(fig)


def real_data_figure(curves: dict[str, list[dict | None]], counts: tuple[str, ...], naive: float | None,
                     oracle: float | None, title: str, path: str | Path,
                     unlabeled: list[dict | None] | None = None, unlabeled_counts: tuple[str, ...] = ()) -> None:
    """Accuracy (mean ± std over seeds, report half) against real images per expert (0 = data-free), one line per
    curve, with naive and the oracle as horizontal lines; beside it, where routers fitted on unlabeled inputs ran,
    their best accuracy against the unlabeled inputs they fitted on (a stream's first N, or the selection half)."""
    plt = _pyplot()
    beside = unlabeled is not None and any(p is not None for p in unlabeled)
    fig, axes = plt.subplots(1, 2 if beside else 1, figsize=(11.0 if beside else 6.4, 3.6), squeeze=False,
                             sharey=True)
    ax = axes[0][0]
    if beside:
        _unlabeled_panel(axes[0][1], unlabeled, unlabeled_counts, naive, oracle)
    x = list(range(len(counts)))
    for curve, points in curves.items():
        shown = [(i, p) for i, p in zip(x, points) if p is not None]
        if shown:
            ax.errorbar([i for i, _ in shown], [100 * p["mean"] for _, p in shown],
                        yerr=[100 * p["std"] for _, p in shown], marker="o", capsize=3, label=curve)
    for value, name, style in ((naive, "naive", ":"), (oracle, "oracle", "--")):
        if value is not None:
            ax.axhline(100 * value, color="black", linestyle=style, linewidth=1, label=f"{name} {100 * value:.1f}")
    ax.set_xticks(x, ["0 (data-free)" if c == "0" else c for c in counts])
    ax.set_xlabel("real training images per expert")
    ax.set_ylabel("accuracy, report half (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def _unlabeled_panel(ax, points: list[dict | None], counts: tuple[str, ...], naive: float | None,
                     oracle: float | None) -> None:
    """The best router fitted on unlabeled inputs per amount of inputs seen: labelled-real data is per expert and
    these inputs are of every domain together, so they get an axis of their own rather than a shared one."""
    shown = [(i, p) for i, p in enumerate(points) if p is not None]
    ax.errorbar([i for i, _ in shown], [100 * p["mean"] for _, p in shown], yerr=[100 * p["std"] for _, p in shown],
                marker="s", capsize=3, color="tab:purple", label="best rule on unlabeled inputs")
    for value, style in ((naive, ":"), (oracle, "--")):
        if value is not None:
            ax.axhline(100 * value, color="black", linestyle=style, linewidth=1)
    names = [f"selection half\n({p['inputs']})" if c == "selection" and p and p.get("inputs") else
             "selection half" if c == "selection" else c for c, p in zip(counts, points)]
    ax.set_xticks(range(len(counts)), names)
    ax.set_xlabel("unlabeled test inputs fitted on (all domains)")
    ax.legend(fontsize=7)
