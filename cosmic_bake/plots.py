"""PNG plots of what people look at: layer similarities and the per-candidate score grids."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_layer_similarities(sims: torch.Tensor, eval_layers: list[int], path: Path, title: str = "") -> Path:
    """cos(mean harmful, mean harmless) of block outputs per layer; L_low marked."""
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = list(range(len(sims)))
    ax.plot(xs, [float(s) for s in sims], marker="o", ms=3, label="cos(harmful mean, harmless mean)")
    ax.scatter(
        eval_layers, [float(sims[j]) for j in eval_layers], color="red", zorder=3, label="evaluation layers (L_low)"
    )
    ax.set_xlabel("layer (block output)")
    ax.set_ylabel("cosine similarity")
    ax.set_title(title or "Harmful vs harmless block outputs, last token")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_score_grids(
    grids: dict[str, torch.Tensor], chosen: tuple[int, int], labels: list[str], path: Path, title: str = ""
) -> Path:
    """One panel per score: a line per candidate position across layers, the choice starred.

    Scores that were not computed are NaN and left out (gaps in the lines; a panel whose name
    says "N of M computed" shows the N points only).
    """
    fig, axes = plt.subplots(1, len(grids), figsize=(5.2 * len(grids), 4.2), squeeze=False)
    n_pos = next(iter(grids.values())).shape[0]
    for ax, (name, grid) in zip(axes[0], grids.items()):
        for i in range(n_pos):
            label = f"{i - n_pos}: {labels[i]!r}" if i < len(labels) else str(i - n_pos)
            ax.plot(range(grid.shape[1]), grid[i].tolist(), marker=".", ms=3, label=label)
        pos, layer = chosen
        ax.scatter([layer], [float(grid[pos, layer])], marker="*", s=180, color="black", zorder=4, label="chosen")
        ax.set_title(name)
        ax.set_xlabel("layer of the candidate")
        ax.set_xlim(-0.5, grid.shape[1] - 0.5)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(title or "Candidate scores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_sweep(xs: list[float], series: dict[str, list[float]], path: Path, xlabel: str, title: str) -> Path:
    """A line per metric against a swept parameter (alpha sweeps)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparison(labels: list[str], series: dict[str, list[float]], path: Path, title: str) -> Path:
    """Grouped bars: one group per compared row (unedited, each selector), one bar per metric."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(labels), 4))
    width = 0.8 / max(1, len(series))
    for k, (name, ys) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_edit_search(
    trials: list[dict], chosen: dict, strengths: list[float], kl_target: float, path: Path, title: str
) -> Path:
    """Left: every trial's validation KL against the separation left, the chosen one ringed; right: its strengths."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    ax.scatter([t["kl"] for t in trials], [t["gap"] for t in trials], s=14, alpha=0.6, label="trials")
    ax.scatter([trials[0]["kl"]], [trials[0]["gap"]], marker="s", color="gray", label="full removal (trial 0)")
    ax.scatter([chosen["kl"]], [chosen["gap"]], s=120, facecolors="none", edgecolors="red", label="chosen")
    ax.axvline(kl_target, color="red", ls="--", lw=0.8)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("harmless first-token KL (validation)")
    ax.set_ylabel("harmful/harmless separation left (0: none)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bx.bar(range(-1, len(strengths) - 1), strengths)
    bx.set_xlabel("layer (-1: embedding)")
    bx.set_ylabel("removal strength")
    bx.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
