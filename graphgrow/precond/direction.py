"""``grad="direction"``: the preconditioned direction formed in the backward pass, in place of
autograd's weight gradient.

The default optimizer receives autograd's weight gradient G = Rᵀ X in ``.grad`` and honours it
(clipping, accumulation, penalties), so a step pays for G and then for the direction D = P_out G P_in
formed from the same factors (pushthrough.py): at least one more out x B x in product per layer.
In this mode each preconditioned ``nn.Linear`` runs its forward through ``_DirectionLinear``,
whose backward computes the input gradient as usual and, instead of G, the batch estimate's
direction D (and P_out Rᵀ 1 for the bias) from the layer's own input X and output gradient R,
with the same formulas and the same inverses as the fast path. So ``.grad`` holds D after
``backward()`` and ``step()`` is an SGD step on it (momentum, decoupled weight decay).

What that means for the user: clipping ``.grad`` clips the direction, not the gradient; two
``backward()`` calls before a step (gradient accumulation, or a layer used twice in one pass) add
two directions, each preconditioned with its own pass's statistics, where the default mode
preconditions the summed gradient with the pooled statistics; a gradient term that does not come
through the layer's output (an L2 penalty inside the loss) reaches ``.grad`` of the other
parameters only. The layer's forward is an instance attribute while the optimizer is attached
(``remove_hooks()`` restores it); a deepcopy or a pickle of the model gets the plain forward.
"""
from __future__ import annotations

import logging
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from graphgrow.errors import GraphgrowError

from .factors import _flat_inputs, _flat_output_grads, _LayerRecord
from .pushthrough import factored_direction, operators_on_factors

# the optimizer's logger: one place to listen to for the paths and modes it takes
_LOG = logging.getLogger("graphgrow.precond.frobenius")
GRAD_MODES = ("gradient", "direction")


class _DirectionLinear(torch.autograd.Function):
    """y = x Wᵀ + b whose backward leaves the preconditioned direction in W's and b's gradient slots."""

    @staticmethod
    def forward(ctx, layer_input, weight, bias, forward):
        ctx.forward = forward
        ctx.has_bias = bias is not None
        ctx.save_for_backward(layer_input, weight)
        return F.linear(layer_input, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        layer_input, weight = ctx.saved_tensors
        grad_input = grad_output @ weight if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_input, None, None, None
        weight_direction, bias_direction = ctx.forward.direction(layer_input, grad_output)
        return grad_input, weight_direction, bias_direction if ctx.has_bias else None, None


class _DirectionForward:
    """The forward that a preconditioned layer gets in ``grad="direction"`` mode (an instance
    attribute of the module). Holds its optimizer weakly: a dropped optimizer leaves a plain layer."""

    def __init__(self, optimizer, index: int, record):
        self.optimizer = weakref.ref(optimizer)
        self.index, self.record = index, record

    def __call__(self, layer_input):
        module, optimizer = self.record.module, self.optimizer()
        if optimizer is None or not torch.is_grad_enabled():
            return F.linear(layer_input, module.weight, module.bias)
        return _DirectionLinear.apply(layer_input, module.weight, module.bias, self)

    def direction(self, layer_input, grad_output):
        return self.optimizer()._backward_direction(self.index, self.record, layer_input, grad_output)

    def __reduce__(self):
        # pickling the model (torch.save(model)) stores the plain forward, as a deepcopy does: when
        # the module is unpickled its attributes are not restored yet, so this finds its class's forward
        return getattr, (self.record.module, "forward")

    def __deepcopy__(self, memo):
        # the copy of the module (deepcopy registers it in memo before copying its attributes) gets
        # its class's own forward: only the optimizer's own layer forms directions
        copy = memo.get(id(self.record.module))
        return self if copy is None else types.MethodType(type(copy).forward, copy)


def install(optimizer, records: list) -> None:
    for index, record in enumerate(records):
        record.module.forward = _DirectionForward(optimizer, index, record)


def uninstall(records: list) -> None:
    for record in records:
        if isinstance(record.module.__dict__.get("forward"), _DirectionForward):
            del record.module.forward


class _Direction:
    """Mixin of FrobeniusPreconditioner: the ``grad="direction"`` mode."""

    @staticmethod
    def _check_grad_mode(grad, labels, backend, track_diagnostics) -> None:
        if grad not in GRAD_MODES:
            raise GraphgrowError(f"unknown grad {grad!r}", hint=f"choose one of {', '.join(GRAD_MODES)}")
        if grad == "direction" and (labels != "true" or backend != "hooks" or track_diagnostics):
            raise GraphgrowError("grad='direction' (the direction formed in the backward pass) needs labels='true', "
                                 "backend='hooks' and no track_diagnostics",
                                 hint="use the default grad='gradient' for the other options")

    def _install_direction_forwards(self) -> None:
        convolutions = [record.name for record in self._records if not isinstance(record.module, nn.Linear)]
        if convolutions:
            raise GraphgrowError("grad='direction' forms the direction in the backward pass of nn.Linear layers only",
                                 node=convolutions[0], hint="use the default grad='gradient' for Conv2d layers")
        install(self, self._records)
        for record in self._records:
            self.paths[record.name] = "direction (formed in the backward pass)"
        _LOG.info("FrobeniusPreconditioner: grad='direction': .grad of layers %s holds the preconditioned "
                  "direction after backward()", ", ".join(repr(record.name) for record in self._records))

    def _backward_direction(self, index: int, record: _LayerRecord, layer_input: torch.Tensor,
                            grad_output: torch.Tensor) -> tuple:
        """P_out Rᵀ X P_in and P_out Rᵀ 1 from one pass's input X and output gradient R, called by the
        layer's backward in grad='direction' mode. On a refresh step the statistics are taken from
        this pass (the refresh and inverses of the default path) and the direction is the fast path's
        (pushthrough.py); between refreshes the kept operators act on the factors, (P_out Rᵀ)(X P_in)."""
        module = record.module
        rows = _flat_output_grads(module, grad_output, layer_input.shape[0])
        layer_input = _flat_inputs(module, layer_input)
        state = self.state[module.weight]
        if state.get("step", 0) % self.update_interval == 0:
            record.inputs[:], record.output_grads[:] = [layer_input], [rows]
            try:
                self._refresh([(index, record, self._layout_table()[0][index][2], state)], None)
                factors = [rows[1]] if self.moment == "second" else None
                direction, bias_direction = factored_direction(state, record.inputs, [rows[0]], factors,
                                                               self.moment == "covariance", self._apply)
            finally:
                record.clear()
            return direction.reshape(module.weight.shape), bias_direction
        direction, bias_direction = operators_on_factors(state, [layer_input], [rows[0]], self._apply)
        return direction.reshape(module.weight.shape), bias_direction
