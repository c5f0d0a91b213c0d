"""Norms of weight gradients that score SensLI candidates (thesis 4.17, B.1a-e)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch.nn.grad import conv2d_input

from ..errors import GraphgrowError
from ..ops.base import Geometry

# -- norms of weight gradients (4.17, B.1a-e) -------------------------------------------------

#: merit norms: fro (4.17, B.1a), fro_width (4.17 scaled by 1/n^2, n the layer's output width),
#: fro_entries (B.1b, scaled by the number of entries), op (B.1c, squared operator norm of the
#: weight as a linear map on its actual input), op_out2 (B.1d), op_out1 (B.1e).
MERIT_NORMS = ("fro", "fro_width", "fro_entries", "op", "op_out2", "op_out1")


def top_eigenvalue(matvec: Callable[[torch.Tensor], torch.Tensor], size: int, *, tol: float = 1e-5,
                   seed: int = 0) -> float:
    """Largest eigenvalue of a symmetric positive semi-definite operator by Lanczos with full
    reorthogonalisation; stops when the Ritz residual is below ``tol`` relative to the Ritz
    value (so the result is accurate to about ``tol``), at the latest after ``size`` steps
    (then exact up to rounding)."""
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(size, generator=generator, dtype=torch.float64)
    basis = torch.empty(min(size, 64), size, dtype=torch.float64)  # rows: the Lanczos vectors
    basis[0] = vector / vector.norm()
    alphas: list[float] = []
    betas: list[float] = []
    theta = 0.0
    for step in range(size):
        w = matvec(basis[step])
        alphas.append(float(w @ basis[step]))
        done = basis[:step + 1]
        for _ in range(2):  # twice is enough to keep the basis orthogonal in floating point
            w = w - done.T @ (done @ w)
        beta = float(w.norm())
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        theta = float(values[-1])
        residual = beta * abs(float(vectors[-1, -1]))
        if residual <= tol * max(theta, 0.0) or beta <= 1e-300 or step + 1 == size:
            break
        betas.append(beta)
        if step + 1 == basis.shape[0]:
            basis = torch.cat([basis, torch.empty_like(basis)])[:size]
        basis[step + 1] = w / beta
    return max(theta, 0.0)


def conv_operator_norm(kernel: torch.Tensor, input_shape: Sequence[int], stride: int = 1,
                       padding: int = 0, *, tol: float = 1e-5) -> float:
    """Largest singular value of the convolution with ``kernel`` (out, in, k, k) as a linear
    map on inputs of shape (in, H, W) with the given stride and zero padding (B.1c)."""
    kernel = kernel.detach().to(torch.float64)
    if kernel.shape[2:] == (1, 1) and tuple(input_shape[1:]) == (1, 1):
        return float(torch.linalg.matrix_norm(kernel[:, :, 0, 0], ord=2))
    if not torch.any(kernel):
        return 0.0
    shape = (1, *input_shape)
    size = math.prod(input_shape)

    def normal_matvec(vector):  # A^T A v, the adjoint by conv2d_input (transposed convolution)
        image = torch.nn.functional.conv2d(vector.reshape(shape), kernel, stride=stride, padding=padding)
        return conv2d_input(shape, kernel, image, stride=stride, padding=padding).reshape(-1)

    return math.sqrt(top_eigenvalue(normal_matvec, size, tol=tol))


def gradient_norm(grad: torch.Tensor, geometry: Geometry | None, norm: str = "fro") -> float:
    """Merit of a weight's gradient under ``norm`` (one of MERIT_NORMS); every value is a
    squared norm, as in (4.17) and (B.1a-e)."""
    if norm in ("fro", "fro_width", "fro_entries"):
        # one fused kernel in float64 (a noticeable part of an evaluation on spiral-sized networks)
        squared = float(torch.linalg.vector_norm(grad.detach(), dtype=torch.float64)) ** 2
        return squared / {"fro": 1, "fro_width": grad.shape[0] ** 2, "fro_entries": grad.numel()}[norm]
    grad = grad.detach().to(torch.float64)
    if norm not in MERIT_NORMS:
        raise GraphgrowError(f"unknown merit norm '{norm}'", option="norm", hint=f"use one of {', '.join(MERIT_NORMS)}")
    if geometry is None:
        raise GraphgrowError(f"norm '{norm}' needs a weight matrix or kernel", option="norm", hint="use 'fro'")
    kernel = geometry.as_kernel(grad)
    if norm == "op":
        return conv_operator_norm(kernel, geometry.input_shape, geometry.stride, geometry.padding) ** 2
    # B.1d/e: per output channel, the single-channel kernel summed over input channels
    channel_shape = (1, *geometry.input_shape[1:])
    per_output = [conv_operator_norm(summed.reshape(1, 1, *summed.shape), channel_shape,
                                     geometry.stride, geometry.padding)
                  for summed in kernel.sum(dim=1)]
    if norm == "op_out2":
        return sum(value ** 2 for value in per_output)
    return sum(per_output) ** 2

