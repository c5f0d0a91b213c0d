"""The exact fast path of (5.15) for batch estimates: the update from the gradient's own factors.

A layer's mean-loss weight gradient is G = Σ_c R_cᵀ X_c over the recorded passes c (R_c: the
output gradients autograd saw, X_c: the layer inputs, as rows). With the push-through identity
X (s·XᵀX + γ I)⁻¹ = (s·XXᵀ + γ I)⁻¹ X the input side needs only the B x B inner matrix of the
Woodbury state, and

    P_out G P_in = (P_out Rᵀ (s·XXᵀ + γ I)⁻¹) X                       (second moment)
    P_out G P_in = (P_out Rᵀ (s·X̃X̃ᵀ + γ I)⁻¹) X̃ + (P_out Rᵀ 1)(P_in μ)ᵀ   (covariance, X = X̃ + 1μᵀ)

with one out x B x in product where the general path needs four (two per Woodbury side). P_out Rᵀ
is out x B: the dense P_out, or its Woodbury form on that small matrix (pre-activation gradient
samples S ≠ R: Monte-Carlo labels, centred), or for true labels and the second moment (S = R up
to the per-pass factors F) the push-through form Sᵀ (s·SSᵀ + γ I)⁻¹ F⁻¹, which has no cancellation.

All of it holds only if ``.grad`` is exactly Σ_c R_cᵀ X_c; ``gradient_matches_factors`` is the
cheap consistency check that backs the optimizer's bookkeeping of the grad tensor.
"""
from __future__ import annotations

import math

import torch

from .factors import _LayerRecord, _weight_matrix


def _cat(chunks: list) -> torch.Tensor:
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def gradient_matches_factors(grad: torch.Tensor, inputs: list, output_grads: list,
                             probes: tuple) -> bool:
    """Whether ``grad`` (out x in) equals Σ_c R_cᵀ X_c within rounding, on a rank-one probe aᵀ·b:
    aᵀ G b against Σ_c (R_c a)ᵀ (X_c b), O(out·in) work. It catches a gradient term that does not
    come through the layer's output (an L2 penalty inside the loss, a hook that rescales the
    gradient) which the grad tensor's identity and version cannot show. The tolerance is a
    rounding bound of both sides: 64·√(in + rows)·ε times the sums of absolute values, where a
    modification below it is below the resolution of the gradient itself."""
    left, right = probes
    projected = (left @ grad) @ right
    factored = sum((r @ left) @ (x @ right) for r, x in zip(output_grads, inputs))
    size = sum((r.abs() @ left.abs()) @ (x.abs() @ right.abs()) for r, x in zip(output_grads, inputs))
    rows = sum(x.shape[0] for x in inputs)
    tolerance = 64 * math.sqrt(grad.shape[1] + rows) * torch.finfo(grad.dtype).eps
    return bool((projected - factored).abs() <= tolerance * size)


def bias_gradient_matches(grad: torch.Tensor, output_grads: list) -> bool:
    """Whether the bias gradient is Σ_c R_cᵀ 1, within a rounding bound (O(rows·out) work)."""
    total = sum(r.sum(0) for r in output_grads)
    size = sum(r.abs().sum(0) for r in output_grads)
    rows = sum(r.shape[0] for r in output_grads)
    return bool(((grad - total).abs() <= 64 * math.sqrt(rows) * torch.finfo(grad.dtype).eps * size).all())


def factored_direction(state: dict, inputs: list, output_grads: list, output_factors: list | None,
                       centred: bool, apply) -> tuple[torch.Tensor, torch.Tensor]:
    """P_out G P_in for G = Σ_c R_cᵀ X_c from the side representations in ``state`` (the same as
    the general path's: ``{side}_operator`` dense, or ``{side}_basis``/``_inner_inverse``/``_damping``
    with the unscaled samples S, estimate s·SᵀS, and inner matrix SSᵀ + γ/s·I). ``output_factors``:
    the per-pass factors f_c when S is the gradient's own output factors (true labels, second
    moment: S = R for one pass, S = cat(f_c R_c) for several), else None. ``apply(state, side, matrix, from_left)`` is the
    general path's operator product, used on out x B matrices and vectors only. Returns the
    direction and P_out Rᵀ 1, the bias's direction when its gradient is Rᵀ 1."""
    gradient_outputs = _cat(output_grads)
    # P_out Rᵀ = outer·core: outer is out x B, core B x B or None (multiplied in later, where cheaper)
    core = None
    if "out_operator" in state:
        outer = state["out_operator"] @ gradient_outputs.T
    elif output_factors is not None:
        # push-through: P_out Sᵀ = Sᵀ (s·SSᵀ + γI)⁻¹ = Sᵀ·inner⁻¹/s, and Rᵀ = Sᵀ F⁻¹
        outer, core = state["out_basis"].T, state["out_inner_inverse"] * (state["out_inner_damping"] / state["out_damping"])
        if len(output_factors) > 1:  # one pass: S = R; several: S = cat(f_c R_c), so divide by F
            core = core / torch.cat([torch.full((len(r),), f, dtype=core.dtype, device=core.device)
                                     for r, f in zip(output_grads, output_factors)])
    else:
        outer = apply(state, "out", gradient_outputs.T, from_left=True)
    ones = outer.new_ones(outer.shape[1] if core is None else core.shape[1], 1)
    bias_direction = (outer @ (ones if core is None else core @ ones)).squeeze(1)  # P_out Rᵀ 1
    if "in_operator" in state:
        left = outer if core is None else outer @ core
        layer_inputs = _cat(inputs)
        # (left X) P_in or left (X P_in), whichever is cheaper
        if left.shape[0] <= layer_inputs.shape[0]:
            return (left @ layer_inputs) @ state["in_operator"], bias_direction
        return left @ (layer_inputs @ state["in_operator"]), bias_direction
    # X̃ P_in = (s·X̃X̃ᵀ + γI)⁻¹ X̃ = inner⁻¹ X̃ / s, with 1/s = γ_inner/γ
    basis = state["in_basis"]
    inner = state["in_inner_inverse"] * (state["in_inner_damping"] / state["in_damping"])
    core = inner if core is None else core @ inner
    # outer·core·X̃ in the cheaper order
    if outer.shape[0] <= basis.shape[1]:
        direction = (outer @ core) @ basis
    else:
        direction = outer @ (core @ basis)
    if centred:
        mean = _cat(inputs).mean(0, keepdim=True)
        direction.addmm_(bias_direction.unsqueeze(1), apply(state, "in", mean, from_left=False))
    return direction, bias_direction


def operators_on_factors(state: dict, inputs: list, output_grads: list, apply) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_out Rᵀ)(X P_in) and P_out Rᵀ 1 for G = Σ_c R_cᵀ X_c = Rᵀ X (the passes stacked) with the
    operators kept from the last refresh (between refreshes, when they do not come from these
    factors): one out x B x in product besides the operators acting on the B-row factors, where
    P_out G P_in acts on out x in matrices."""
    layer_inputs, outer = _cat(inputs), apply(state, "out", _cat(output_grads).T, from_left=True)  # P_out Rᵀ
    if layer_inputs.shape[0] <= outer.shape[0]:  # the cheaper order
        direction = outer @ apply(state, "in", layer_inputs, from_left=False)
    else:
        direction = apply(state, "in", outer @ layer_inputs, from_left=False)
    return direction, outer.sum(1)


class _PushThrough:
    """Mixin of FrobeniusPreconditioner: when a layer's refresh step may take the fast path."""

    def _fast_path_refusal(self, index: int, record: _LayerRecord, state: dict, refreshing: bool) -> str | None:
        """Why this step's weight direction cannot come from the gradient's factors (pushthrough.py),
        or None when it can: on a refresh step the batch estimate of the hooks backend, between
        refreshes a layer with fewer samples than inputs and outputs; and a ``.grad`` that is
        exactly what autograd accumulated from the recorded passes."""
        if not self.fast_path:
            return "fast_path=False"
        if self.backend != "hooks":
            return "the fast path needs the hooks backend"
        if not record.inputs:
            return "no passes recorded since the last step"
        if refreshing:
            if self.estimate != "batch" or index in self._inner_products:
                return "the fast path needs batch estimates of the hooks backend on both sides"
            if "out_operator" in state and "in_operator" in state:
                return "both factors are dense (at least as many samples as features): P_out ∇W P_in is cheaper"
        elif sum(len(x) for x in record.inputs) >= min(_weight_matrix(record.module.weight).shape):
            return "at least as many samples as inputs or outputs: P_out ∇W P_in is cheaper"
        grad = record.module.weight.grad
        if not record.grad_was_none:
            return ".grad was not None before the step's first recorded pass (zero_grad(set_to_none=False), " \
                   "or gradients accumulated across steps)"
        if record.accumulated != (id(grad), grad._version):
            return ".grad was changed after backward (clipping, weight decay added, ...)"
        outputs = self._gradient_outputs(record)
        if [len(x) for x in record.inputs] != [len(r) for r in outputs]:
            return "the recorded forward passes and backward passes do not pair up"
        if record.probes is None:
            generator = torch.Generator(grad.device).manual_seed(0)  # private: the global RNG stays untouched
            record.probes = tuple(torch.randn(size, generator=generator, dtype=grad.dtype, device=grad.device)
                                  for size in _weight_matrix(grad).shape)
        if not gradient_matches_factors(_weight_matrix(grad), record.inputs, outputs, record.probes):
            return ".grad has a term that does not come through the layer's output (a penalty in the loss?)"
        return None

    def _gradient_outputs(self, record: _LayerRecord) -> list:
        return record.gradient_outputs if self.labels == "sampled" else [grad for grad, _ in record.output_grads]
