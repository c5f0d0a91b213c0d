"""Plots of an RMNTR run: F and h on the finest level against iterations, work and wall time
(recursive steps marked), and the sparsity of the penalised parameters."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from ..runtime.plots import _save  # noqa: E402  (one place that writes figures)

AXES = (("iteration", "fine iteration"), ("work", "work [fine gradients]"), ("time", "wall time [s]"))


def fine_curves(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Arrays over the finest level's steps (accepted or not)."""
    steps = [r for r in records if r.get("event") == "step" and r.get("level") == 0]
    column = lambda key: np.array([np.nan if r.get(key) is None else r[key] for r in steps], dtype=float)  # noqa: E731
    return {"iteration": column("iteration"), "work": column("work"), "time": column("elapsed"),
            "F": column("F"), "h": column("h"),
            "recursive": np.array([r["kind"] == "recursive" for r in steps], dtype=bool),
            "accepted": np.array([bool(r["accepted"]) for r in steps], dtype=bool)}


def plot_progress(runs: dict[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """2 x 3 panels: F (top) and h (bottom) against iteration, work and time, one line per run;
    accepted recursive steps marked with dots."""
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharey="row")
    for index, (name, records) in enumerate(runs.items()):
        curves = fine_curves(records)
        marks = curves["recursive"] & curves["accepted"]
        for col, (key, label) in enumerate(AXES):
            for row, metric in enumerate(("F", "h")):
                axis = axes[row, col]
                axis.plot(curves[key], curves[metric], color=f"C{index}", label=name if col == row == 0 else None)
                if marks.any():
                    axis.plot(curves[key][marks], curves[metric][marks], ".", color=f"C{index}", markersize=4)
                axis.set_yscale("log")
                axis.grid(alpha=0.3)
                axis.set_xlabel(label)
    axes[0, 0].set_ylabel("F = f + phi")
    axes[1, 0].set_ylabel("h (stationarity)")
    axes[0, 0].legend(fontsize=8)
    if title:
        figure.suptitle(title + "  (dots: accepted coarse steps)")
    figure.tight_layout()
    return _save(figure, path)


def plot_sparsity(weights: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Per penalised tensor: share of exact zeros (bar) and the histogram of log10 |w| of all."""
    figure, (bars, histogram) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(weights)
    bars.bar(range(len(names)), [float(np.mean(w == 0)) for w in weights.values()], color="C0")
    bars.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    bars.set_ylabel("share of zero entries")
    bars.set_ylim(0, 1)
    values = np.concatenate([np.abs(w).ravel() for w in weights.values()]) if weights else np.zeros(0)
    nonzero = values[values > 0]
    if nonzero.size:
        histogram.hist(np.log10(nonzero), bins=40, color="C1")
    histogram.set_xlabel(f"log10 |w| of the nonzero entries ({int((values == 0).sum())} of {values.size} are 0)")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)
