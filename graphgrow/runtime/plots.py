"""Plots of runs (matplotlib, Agg backend, PNG): training loss and test error over iterations
and over wall time, with dotted vertical lines where the architecture changed (the thesis
figures' convention), and comparisons of several strategies (mean and spread over seeds)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from .runlog import select  # noqa: E402

INSERTION_EVENTS = ("insertion", "widening")


def run_curves(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-evaluation arrays (iteration, time, train_loss, test_loss, test_error) of a run and
    the iterations/times of its architecture changes."""
    evals = select(records, "eval")
    column = lambda key: np.array([np.nan if r.get(key) is None else r[key] for r in evals], dtype=float)
    changes = [r for r in records if r.get("event") in INSERTION_EVENTS and r.get("inserted", True)]
    # wall time counts from the start of training, not from when the log was opened
    origin = next((r["time"] for r in records if r.get("event") == "start"), 0.0)
    return {"iteration": column("iteration"), "epoch": column("epoch"), "time": column("time") - origin,
            "train_loss": column("train_loss"), "test_loss": column("test_loss"),
            "test_error": column("test_error"),
            "change_iteration": np.array([r["iteration"] for r in changes], dtype=float),
            "change_time": np.array([r["time"] - origin for r in changes], dtype=float)}


def _mark_changes(axis, positions) -> None:
    for k, position in enumerate(positions):
        axis.axvline(position, color="0.35", linestyle=":", linewidth=1.2,
                     label="layer insertion" if k == 0 else None)


def plot_run(records: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """One PNG, 2x2 panels: loss and test error over iterations (left) and wall time (right)."""
    curves = run_curves(records)
    figure, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex="col")
    for col, (x_key, marks, label) in enumerate((("iteration", "change_iteration", "iteration"),
                                                  ("time", "change_time", "wall time [s]"))):
        loss_axis, error_axis = axes[0, col], axes[1, col]
        loss_axis.plot(curves[x_key], curves["train_loss"], label="train loss", color="C0")
        if np.isfinite(curves["test_loss"]).any():
            loss_axis.plot(curves[x_key], curves["test_loss"], label="test loss", color="C1", alpha=0.8)
        loss_axis.set_yscale("log")
        loss_axis.set_ylabel("loss")
        if np.isfinite(curves["test_error"]).any():
            error_axis.plot(curves[x_key], curves["test_error"], color="C2", label="test error")
        error_axis.set_ylabel("test error")
        error_axis.set_xlabel(label)
        for axis in (loss_axis, error_axis):
            _mark_changes(axis, curves[marks])
            axis.grid(alpha=0.3)
        loss_axis.legend(loc="upper right", fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def plot_comparison(runs: dict[str, list[Sequence[dict]]], path: str | Path, *, x: str = "iteration",
                    title: str = "", metrics: Sequence[str] = ("train_loss", "test_error")) -> Path:
    """Median and interquartile band over seeds for each named strategy; ``x`` is
    ``iteration`` or ``time`` (wall time: each run's curve is resampled onto a common grid)."""
    figure, axes = plt.subplots(len(metrics), 1, figsize=(8, 3.2 * len(metrics)), sharex=True, squeeze=False)
    for index, (name, seed_runs) in enumerate(runs.items()):
        curves = [run_curves(r) for r in seed_runs]
        if not curves:
            continue
        color = f"C{index}"
        if x == "time":
            # up to the shortest run, so every point is a median over all seeds
            grid = np.linspace(0, min(c["time"][-1] for c in curves), 200)
        else:
            grid = curves[0]["iteration"]
        for row, metric in enumerate(metrics):
            stacked = np.stack([np.interp(grid, c[x], c[metric], right=np.nan) for c in curves])
            median = np.nanmedian(stacked, axis=0)
            low, high = np.nanpercentile(stacked, 25, axis=0), np.nanpercentile(stacked, 75, axis=0)
            axis = axes[row, 0]
            axis.plot(grid, median, color=color, label=f"{name} (n={len(curves)})")
            axis.fill_between(grid, low, high, color=color, alpha=0.2)
        marks = curves[0]["change_iteration" if x == "iteration" else "change_time"]
        for position in (marks if x == "iteration" else []):
            for row in range(len(metrics)):
                axes[row, 0].axvline(position, color=color, linestyle=":", linewidth=1.0)
    for row, metric in enumerate(metrics):
        axis = axes[row, 0]
        axis.set_ylabel(metric.replace("_", " "))
        if "loss" in metric:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("wall time [s]" if x == "time" else "iteration")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
