"""The estimates behind the preconditioner's two factors: the samples as matrices, the damped
estimates (batch, averaged, or user-given) and their inverses, batched per matrix size, kept in the
optimizer state either as dense operators or in the Woodbury form; the operator products; and the
diagnostics computed from them."""
from __future__ import annotations

import warnings

import torch

from graphgrow.errors import GraphgrowError

from .factors import _inner_inverse64, _isotropic_start, _LayerRecord, _Pending, _spd_inverses

_MAX_DAMPING_RAISES = 12


class _Estimates:
    """Mixin of FrobeniusPreconditioner: the statistics and their inverses (optimizer state)."""

    @staticmethod
    def _apply(state: dict, side: str, matrix: torch.Tensor, from_left: bool) -> torch.Tensor:
        """Multiply by the side's operator (from the left for 'out', from the right for 'in')."""
        if f"{side}_operator" in state:
            operator = state[f"{side}_operator"]
            return operator @ matrix if from_left else matrix @ operator
        # Woodbury with the unscaled samples S (C = s·SᵀS): (γI + C)⁻¹ M = (M − Sᵀ (γ/s·I + SSᵀ)⁻¹ S M) / γ.
        # The small inner inverse is explicit because one matmul with it is cheaper than
        # cholesky_solve's two triangular solves at these sizes
        samples, inner_inverse, damping = state[f"{side}_basis"], state[f"{side}_inner_inverse"], state[f"{side}_damping"]
        dtype = matrix.dtype
        if dtype != torch.float64:
            # the difference cancels: where M lies in the span of S it is about M/λ, the terms M/γ, so
            # in float32 it lost up to 3e-3 (MNIST inputs, γ = 1e-3); in float64, and the inner
            # inverse redone in float64 once per refresh
            samples, matrix, inner_inverse = samples.double(), matrix.double(), _inner_inverse64(state, side)
        # addmm fuses the subtraction and the division into the last product (no temporaries of M's size)
        if from_left:
            result = torch.addmm(matrix, samples.T, inner_inverse @ (samples @ matrix), beta=1 / damping,
                                 alpha=-1 / damping)
        else:
            result = torch.addmm(matrix, (matrix @ samples.T) @ inner_inverse, samples, beta=1 / damping,
                                 alpha=-1 / damping)
        return result.to(dtype)

    def _samples(self, record: _LayerRecord, side: str) -> tuple:
        """(S, s): the recorded samples as rows and the scale of the estimate s·SᵀS."""
        if side == "in":
            chunks = [(chunk, 1) for chunk in record.inputs]
        else:
            chunks = record.output_grads
        if not chunks:
            raise GraphgrowError(f"no recorded {'layer inputs' if side == 'in' else 'pre-activation gradients'} "
                                 "for a refresh step", node=record.name,
                                 hint="run forward and backward of the model the optimizer was built with "
                                      "(with gradients enabled) before step()")
        if len(chunks) == 1:
            (samples, factor), = chunks
            return samples, factor * factor / samples.shape[0]
        samples = torch.cat([chunk * factor for chunk, factor in chunks])
        return samples, 1.0 / samples.shape[0]

    def _backpack_second_moment(self, record: _LayerRecord, side: str) -> torch.Tensor:
        savefield = "kfac" if self.labels == "sampled" else "kflr"
        factors = getattr(record.module.weight, savefield, None)
        if factors is None:
            raise GraphgrowError(f"no BackPACK '{savefield}' factors on the layer", node=record.name,
                                 hint="run loss.backward() inside `with backpack(*optimizer.backpack_extensions())`")
        return factors[0] if side == "out" else factors[1]

    def _refresh(self, due: list, entry) -> None:
        """Take this step's statistics of the ``due`` layers ((index, record, group, state)) and
        rebuild both factors of each (or keep a user inner product). All damped estimates are
        factorised and inverted together, one batched LAPACK call per matrix size: a step needs
        several small inverses and their per-call overhead is a large part of its cost."""
        pending, spectra = [], []
        for index, record, group, state in due:
            for side, damping in (("out", group["damping_out"]), ("in", group["damping_in"])):
                user = self._inner_products.get(index, {}).get("input" if side == "in" else "output")
                if user is not None:
                    state[f"{side}_operator"] = user
                    continue
                samples, scale, covariance = None, 1.0, None
                if self.backend == "backpack":
                    covariance = self._backpack_second_moment(record, side)
                else:
                    # the estimate is scale·SᵀS; the scale is folded into later products (no copy of S)
                    samples, scale = self._samples(record, side)
                    if self.moment == "covariance":
                        samples = samples - samples.mean(0, keepdim=True)
                if entry is not None and (state.get("step", 0) // self.update_interval) % self.spectrum_interval == 0:
                    # eigenvalues of wide estimates are expensive, so only every spectrum_interval-th refresh
                    spectra.append((record.name, side, samples, scale, covariance))
                low_rank = samples is not None and self.estimate == "batch" and damping > 0 and (
                    self.woodbury is True or (self.woodbury == "auto" and samples.shape[0] < samples.shape[1]))
                if low_rank:
                    # inner matrix γ/s·I + SSᵀ: the Woodbury identity for γI + s·SᵀS without scaling S
                    pending.append(_Pending(record, state, side, samples @ samples.T, damping / scale, True,
                                            samples=samples, scale=scale))
                    continue
                fresh = covariance is None
                if fresh:
                    covariance = (samples.T @ samples).mul_(scale)
                # a first estimate of fewer samples than features (or of unknown rank: BackPACK's) is
                # rank deficient: the averages then start from τ·I; a full-rank one starts them itself
                deficient = samples is None or samples.shape[0] < samples.shape[1]
                if self.estimate == "ema":
                    # lerp: one new matrix, (1 − β)·A + β·C; not in place, as a loaded state_dict may share tensors
                    previous = state.get(f"{side}_average")
                    if previous is None and deficient:
                        previous = _isotropic_start(covariance)
                    if previous is not None:
                        covariance = torch.lerp(previous, covariance, group["beta"])
                    state[f"{side}_average"] = covariance
                    fresh = False
                elif self.estimate == "ema_inverse" and f"{side}_operator" not in state and deficient:
                    start = _isotropic_start(covariance)
                    start.diagonal().add_(damping)
                    state[f"{side}_operator"] = torch.cholesky_inverse(torch.linalg.cholesky(start))
                pending.append(_Pending(record, state, side, covariance, damping, fresh, beta=group["beta"]))
        by_size = {}
        for item in pending:
            by_size.setdefault((item.matrix.shape, item.matrix.dtype, item.matrix.device), []).append(item)
        for items in by_size.values():
            for item, inverse in zip(items, self._damped_inverses(items)):
                self._store(item, inverse)
        # after the factorisations, which raise a GraphgrowError on non-finite statistics first
        for name, side, samples, scale, covariance in spectra:
            entry.setdefault(name, {})[f"{side}_spectrum"] = self._spectrum(samples, scale, covariance)

    def _damped_inverses(self, items: list) -> list:
        """(matrix + damping·I)⁻¹ of every pending item, batched; an item whose damped matrix is
        not positive definite is redone alone with raised damping (and its ``damping`` updated)."""
        if len(items) == 1 and items[0].fresh:
            stacked = items[0].matrix.unsqueeze(0)  # nobody else holds it: damp in place
        else:
            stacked = torch.stack([item.matrix for item in items])  # a copy, so damping in place is safe
        # add to the diagonals in place: cheaper than adding damping·eye (no second dense matrix)
        dampings = {item.damping for item in items}
        stacked.diagonal(dim1=-2, dim2=-1).add_(dampings.pop() if len(dampings) == 1 else torch.tensor(
            [[item.damping] for item in items], dtype=stacked.dtype, device=stacked.device))
        inverses, failed = _spd_inverses(stacked)
        if failed.any():  # one synchronising check for the batch; diagnosis only on failure
            for position in failed.nonzero().flatten().tolist():
                item = items[position]
                undamped = stacked[position].clone()
                undamped.diagonal().sub_(item.damping)
                inverses[position], item.damping = self._raised_damping_inverse(item.record, item.side, undamped,
                                                                                item.damping, item.scale)
        return inverses.unbind()

    def _raised_damping_inverse(self, record, side, matrix, damping, scale: float = 1.0):
        """(inverse of matrix + raised damping·I, raised damping), raising the damping until the
        damped matrix is positive definite (the batched attempt at ``damping`` has failed already).
        ``matrix`` is the estimate divided by ``scale`` (the Woodbury inner matrix), so the damping the
        user set is ``damping·scale``."""
        if not torch.isfinite(matrix).all():
            raise GraphgrowError(f"non-finite {'input' if side == 'in' else 'pre-activation gradient'} "
                                 "statistics", node=record.name, hint="training diverged; lower the learning rate")
        for _ in range(_MAX_DAMPING_RAISES):
            raised = max(10.0 * damping, 1e-7 * (float(matrix.diagonal().abs().mean()) or 1.0))
            warnings.warn(f"FrobeniusPreconditioner: layer '{record.name}' ({side} side): damped estimate not "
                          f"positive definite at damping {damping * scale:.3g}; raising it to {raised * scale:.3g}",
                          stacklevel=5)
            damping = raised
            damped = matrix.clone()
            damped.diagonal().add_(damping)
            inverse, failed = _spd_inverses(damped.unsqueeze(0))
            if not failed.item():
                return inverse[0], damping
        raise GraphgrowError("could not make the damped estimate positive definite", node=record.name,
                             hint="the statistics are degenerate; raise damping_in/damping_out")

    def _store(self, item: "_Pending", inverse: torch.Tensor) -> None:
        state, side = item.state, item.side
        if item.samples is not None:
            state.pop(f"{side}_operator", None)
            state.pop(f"{side}_average", None)
            state.pop(f"{side}_inner_inverse64", None)
            state[f"{side}_basis"], state[f"{side}_inner_inverse"] = item.samples, inverse
            state[f"{side}_damping"] = float(item.damping * item.scale)
            state[f"{side}_inner_damping"] = float(item.damping)
            return
        for key in ("basis", "inner_inverse", "damping", "inner_damping", "inner_inverse64"):
            state.pop(f"{side}_{key}", None)
        previous = state.get(f"{side}_operator")
        if self.estimate == "ema_inverse" and previous is not None:
            inverse = torch.lerp(previous, inverse, item.beta)
        state[f"{side}_operator"] = inverse

    @staticmethod
    def _spectrum(samples, scale, covariance) -> torch.Tensor:
        """Eigenvalues of the (undamped) estimate, descending; from the small Gram matrix if low rank.
        In float64: single-precision eigvalsh can fail to converge on the badly conditioned
        estimates met in training."""
        if covariance is None:
            samples = samples.double()
            if samples.shape[0] < samples.shape[1]:
                eigenvalues = torch.linalg.eigvalsh(samples @ samples.T) * scale
                eigenvalues = torch.cat([eigenvalues, eigenvalues.new_zeros(samples.shape[1] - samples.shape[0])])
            else:
                eigenvalues = torch.linalg.eigvalsh(samples.T @ samples * scale)
        else:
            eigenvalues = torch.linalg.eigvalsh(covariance.double())
        return eigenvalues.flip(0).clamp_min(0).float().cpu()

    @staticmethod
    def _norms(module, weight_direction, bias_direction) -> dict:
        """Euclidean gradient norm and Frobenius-type norm sqrt(<∇f, P∇f>) (B.4)."""
        euclidean = module.weight.grad.pow(2).sum()
        frobenius = (module.weight.grad * weight_direction).sum()
        if bias_direction is not None:
            euclidean = euclidean + module.bias.grad.pow(2).sum()
            frobenius = frobenius + (module.bias.grad * bias_direction).sum()
        return {"euclidean_norm": float(euclidean.sqrt()), "frobenius_norm": float(frobenius.clamp_min(0).sqrt())}
