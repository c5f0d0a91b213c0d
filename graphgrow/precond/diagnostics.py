"""Plots of the diagnostics recorded by ``FrobeniusPreconditioner(track_diagnostics=True)``.

Gradient norms per layer over the iterations (thesis Figures 5.2, 5.5, 5.11) and the eigenvalue
spectra of the covariance estimates over the iterations (Figures 5.3, 5.6, 5.7, 5.12).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def gradient_norm_history(diagnostics: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{layer: {"euclidean_norm": [...], "frobenius_norm": [...]}} over the recorded steps."""
    history: dict[str, dict[str, list[float]]] = {}
    for entry in diagnostics:
        for layer, values in entry.items():
            for key in ("euclidean_norm", "frobenius_norm"):
                history.setdefault(layer, {}).setdefault(key, []).append(values[key])
    return history


def plot_gradient_norms(diagnostics: list[dict], path: str, title: str = "") -> None:
    """Euclidean and Frobenius-type gradient norms per layer against iterations (log scale)."""
    history = gradient_norm_history(diagnostics)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for layer, norms in history.items():
        axes[0].semilogy(norms["euclidean_norm"], label=layer, linewidth=0.8)
        axes[1].semilogy(norms["frobenius_norm"], label=layer, linewidth=0.8)
    axes[0].set_title("Euclidean gradient norm")
    axes[1].set_title("Frobenius-type norm sqrt(<∇f, P∇f>)")
    for axis in axes:
        axis.set_xlabel("iteration")
    axes[1].legend(fontsize=7, title="layer")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_spectra(diagnostics: list[dict], path: str, title: str = "", largest: int = 30) -> None:
    """Eigenvalues (the ``largest`` of each estimate) of the input and pre-activation-gradient
    covariances against the refresh iterations, one column per side, one row per layer."""
    # layers in network order (the order the optimizer visits them), not sorted by name
    layers = list(dict.fromkeys(layer for entry in diagnostics for layer, values in entry.items()
                                if "in_spectrum" in values))
    figure, axes = plt.subplots(len(layers), 2, figsize=(11, 2.4 * len(layers)), squeeze=False)
    for row, layer in enumerate(layers):
        for column, side in enumerate(("in_spectrum", "out_spectrum")):
            steps = [i for i, entry in enumerate(diagnostics) if side in entry.get(layer, {})]
            for index in range(largest):
                values = [float(diagnostics[i][layer][side][index]) if index < len(diagnostics[i][layer][side])
                          else float("nan") for i in steps]
                axes[row, column].semilogy(steps, [max(v, 1e-12) for v in values], linewidth=0.6)
            axes[row, column].set_title(f"{layer}: {'inputs C_x' if column == 0 else 'pre-activation gradients C_y'}",
                                        fontsize=8)
    axes[-1, 0].set_xlabel("iteration")
    axes[-1, 1].set_xlabel("iteration")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
