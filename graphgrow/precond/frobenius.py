"""Frobenius-type layer-wise preconditioning (thesis chapter 5) as a ``torch.optim.Optimizer``.

For every ``nn.Linear`` (and ``nn.Conv2d``, on unfolded inputs) the update direction is (5.15)

    P_out · ∇_W f · P_in     and     P_out · ∇_b f  (Remark 5.3),

where ``P_out = (C_y + γ1 I)⁻¹`` is built from back-propagated pre-activation gradients and
``P_in = (C_x + γ2 I)⁻¹`` from the layer inputs (the inner product on X is the damped inverse
covariance, on Y the damped covariance). Either side may instead be a user-given inner product
(Example 5.4): ``P_in = M_X`` and ``P_out = M_Y⁻¹``.

The statistics are captured by forward hooks and tensor hooks on the layer outputs (backend
``"hooks"``, which works on any module, residual graphs included) or read from BackPACK's
Kronecker factors KFAC/KFLR (backend ``"backpack"``, second moments, graphs without branching).

The optimizer class is here (options, step, momentum and weight decay); its parts are mixins by
idea: ``recording.py`` (the hooks), ``estimates.py`` (statistics, damped inverses, the operator
products), ``pushthrough.py`` (the fast path and when it is taken), ``direction.py`` (the opt-in
``grad="direction"`` mode), ``factors.py`` (the per-layer records and the batched SPD inverses).
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from graphgrow.errors import GraphgrowError

from .estimates import _Estimates
from .direction import _Direction
from .factors import _conv_supported, _LayerRecord, _weight_matrix
from .pushthrough import _PushThrough, bias_gradient_matches, factored_direction, operators_on_factors
from .recording import _Recording

_LOG = logging.getLogger(__name__)

MOMENTS = ("second", "covariance")
LABEL_SOURCES = ("true", "sampled", "expected")
ESTIMATES = ("batch", "ema", "ema_inverse")
BACKENDS = ("hooks", "backpack")


class FrobeniusPreconditioner(_Recording, _Estimates, _PushThrough, _Direction, torch.optim.Optimizer):
    """SGD with the Frobenius-type layer-wise preconditioner (5.15) on every Linear/Conv2d layer.

    Use it like any optimizer: ``zero_grad()``, forward, ``loss.backward()``, ``step()``. The hooks
    record the statistics during forward/backward of ``model``; the loss must be a mean over the
    batch (per-sample gradients are recovered by multiplying with the batch size).

    Args:
        model: the module whose Linear/Conv2d layers are preconditioned (found via ``modules()``).
        params: parameters or param-group dicts (default ``model.parameters()``); groups may set
            ``lr``, ``damping_out`` (γ1), ``damping_in`` (γ2), ``beta``, ``momentum``, ``nesterov``
            and ``weight_decay``.
        moment: ``"second"`` (uncentred, the K-FAC backbone) or ``"covariance"`` (centred, (5.8), (5.12)).
        labels: where the pre-activation gradient samples come from: ``"true"`` (the training labels,
            Remark 5.5), ``"sampled"`` (labels drawn from the model's predictive distribution,
            Monte-Carlo Fisher, Examples 2.48/2.49) or ``"expected"`` (the exact expectation over
            the predictive distribution; BackPACK KFLR, backend ``"backpack"`` only).
        loss: the loss module (``nn.CrossEntropyLoss`` or ``nn.MSELoss`` with mean reduction);
            needed for ``labels="sampled"`` with the hooks backend.
        mc_samples: label samples per datum for ``labels="sampled"``.
        estimate: ``"batch"`` (current mini-batch, (5.11)), ``"ema"`` (exponential average of the
            covariance with weight ``beta`` on the new estimate) or ``"ema_inverse"`` (average of the
            damped inverses).
        update_interval: K; statistics are taken and the preconditioner refreshed every K steps and
            reused in between.
        woodbury: ``"auto"`` uses the Woodbury identity for batch estimates whenever there are fewer
            samples than features; ``True`` always (batch estimates only), ``False`` never.
        inner_products: ``{layer name or module: {"input": M_X, "output": M_Y}}`` user-given SPD
            inner-product matrices replacing the data-driven one on that side.
        backend: ``"hooks"`` or ``"backpack"`` (the model must be ``backpack.extend``-ed and backward
            run inside ``with backpack(*optimizer.backpack_extensions())``).
        fast_path: form the batch estimate's update from the gradient's factors (pushthrough.py)
            on refresh steps whose ``.grad`` is autograd's own; False: always the general path.
        momentum, nesterov: heavy-ball momentum on the preconditioned direction, as torch.optim.SGD's.
        weight_decay: decoupled weight decay, param ← (1 − lr·wd)·param before the step.
        grad: ``"gradient"``: ``.grad`` holds autograd's gradient, which ``step()`` preconditions
            (honouring changes made to it); ``"direction"``: each Linear's backward leaves the
            preconditioned direction in ``.grad`` in place of the weight gradient (cheaper; clipping
            and accumulation then act on directions; direction.py).
        track_diagnostics: record gradient norms (Euclidean and Frobenius-type) every step and the
            covariance spectra every ``spectrum_interval``-th refresh, in ``self.diagnostics`` (one
            dict per step: ``{layer: {"euclidean_norm", "frobenius_norm", "in_spectrum", "out_spectrum"}}``).
    """

    def __init__(self, model: nn.Module, params=None, *, lr: float = 0.1, damping_out: float = 0.01,
                 damping_in: float = 0.01, beta: float = 0.1, moment: str = "second", labels: str = "true",
                 loss: nn.Module | None = None, mc_samples: int = 1, estimate: str = "batch",
                 update_interval: int = 1, woodbury="auto", inner_products: dict | None = None,
                 backend: str = "hooks", track_diagnostics: bool = False, spectrum_interval: int = 10,
                 fast_path: bool = True, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 grad: str = "gradient"):
        self._check_options(moment, labels, loss, mc_samples, estimate, update_interval, woodbury, backend,
                            lr, damping_out, damping_in, beta)
        self._check_grad_mode(grad, labels, backend, track_diagnostics)
        if momentum < 0 or weight_decay < 0 or (nesterov and momentum <= 0):
            raise GraphgrowError(f"need momentum >= 0 and weight_decay >= 0, and momentum > 0 for nesterov; got "
                                 f"momentum={momentum}, weight_decay={weight_decay}, nesterov={nesterov}")
        defaults = dict(lr=lr, damping_out=damping_out, damping_in=damping_in, beta=beta, momentum=momentum,
                        nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(model.parameters() if params is None else params, defaults)
        self.model = model
        self.moment, self.labels, self.loss, self.mc_samples = moment, labels, loss, mc_samples
        self.estimate, self.update_interval, self.woodbury, self.backend = estimate, update_interval, woodbury, backend
        self.track_diagnostics, self.spectrum_interval = track_diagnostics, spectrum_interval
        self.fast_path, self.grad = fast_path, grad
        self.paths: dict[str, str] = {}  # layer name: the path its last refresh step took
        self.diagnostics: list[dict] = []
        self._records = self._find_layers(model)
        self._inner_products = self._check_inner_products(inner_products or {})
        self._sampling = False
        self._hook_handles = []
        self._layout = None
        if grad == "direction":
            self._install_direction_forwards()
        elif backend == "hooks":
            self._install_hooks()
        else:
            self._check_backpack_model()
        self._warn_sgd_fallback()

    # ----------------------------------------------------------------------------- set-up checks
    @staticmethod
    def _check_options(moment, labels, loss, mc_samples, estimate, update_interval, woodbury, backend,
                       lr, damping_out, damping_in, beta):
        for value, allowed, what in ((moment, MOMENTS, "moment"), (labels, LABEL_SOURCES, "labels"),
                                     (estimate, ESTIMATES, "estimate"), (backend, BACKENDS, "backend")):
            if value not in allowed:
                raise GraphgrowError(f"unknown {what} {value!r}", hint=f"choose one of {', '.join(allowed)}")
        if woodbury not in ("auto", True, False):
            raise GraphgrowError(f"woodbury must be 'auto', True or False, got {woodbury!r}")
        if woodbury is True and estimate != "batch":
            raise GraphgrowError("the Woodbury identity applies to batch estimates only",
                                 hint="an averaged covariance is full rank; use woodbury='auto' or False")
        if lr < 0 or damping_out < 0 or damping_in < 0 or not 0 < beta <= 1:
            raise GraphgrowError(f"need lr >= 0, damping >= 0 and 0 < beta <= 1; got lr={lr}, "
                                 f"damping_out={damping_out}, damping_in={damping_in}, beta={beta}")
        if int(update_interval) != update_interval or update_interval < 1 or mc_samples < 1:
            raise GraphgrowError(f"update_interval and mc_samples must be positive integers, got "
                                 f"{update_interval} and {mc_samples}")
        if backend == "hooks":
            if labels == "expected":
                raise GraphgrowError("labels='expected' (exact Fisher factor) needs backend='backpack' (KFLR)",
                                     hint="use labels='sampled' for the Monte-Carlo Fisher with the hooks backend")
            if labels == "sampled":
                reduction = getattr(loss, "reduction", None)
                if not isinstance(loss, (nn.CrossEntropyLoss, nn.MSELoss)) or reduction != "mean":
                    raise GraphgrowError("labels='sampled' needs loss=nn.CrossEntropyLoss() or nn.MSELoss() "
                                         "with reduction='mean'", hint="the loss defines the predictive distribution")
                if isinstance(loss, nn.CrossEntropyLoss) and (loss.weight is not None or loss.label_smoothing):
                    raise GraphgrowError("labels='sampled' supports CrossEntropyLoss without class weights "
                                         "or label smoothing")
        else:
            if moment != "second":
                raise GraphgrowError("BackPACK's Kronecker factors are uncentred second moments",
                                     hint="use moment='second' with backend='backpack', or backend='hooks'")
            if labels == "true":
                raise GraphgrowError("BackPACK's Kronecker factors use sampled (KFAC) or expected (KFLR) labels",
                                     hint="use labels='sampled' or 'expected', or backend='hooks' for true labels")
            if woodbury is True:
                raise GraphgrowError("BackPACK hands over dense Kronecker factors, so Woodbury does not apply")

    def _find_layers(self, model: nn.Module) -> list[_LayerRecord]:
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        # nn.MultiheadAttention applies its out_proj's weights itself, so that layer's forward
        # (and the hooks that record its statistics) never runs: a plain step, as unsupported layers
        called_by_parent = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        records = []
        for name, module in model.named_modules():
            if (not isinstance(module, (nn.Linear, nn.Conv2d)) or id(module.weight) not in owned
                    or id(module) in called_by_parent):
                continue
            if isinstance(module, nn.Conv2d) and (self.backend == "backpack" or not _conv_supported(module)):
                continue
            if module.bias is not None and id(module.bias) not in owned:
                raise GraphgrowError("a layer's weight is optimized but its bias is not", node=name,
                                     hint="pass both parameters of the layer or neither")
            records.append(_LayerRecord(name or type(module).__name__, module))
        return records

    def _check_inner_products(self, inner_products: dict) -> dict:
        """Validate user inner products; return {record index: {"input": P_in, "output": P_out}}."""
        by_key = {}
        for index, record in enumerate(self._records):
            by_key[record.name] = index
            by_key[id(record.module)] = index
        operators = {}
        for key, sides in inner_products.items():
            index = by_key.get(id(key) if isinstance(key, nn.Module) else key)
            if index is None:
                raise GraphgrowError(f"inner product given for {key!r}, which is not a preconditioned layer",
                                     hint=f"preconditioned layers: {[r.name for r in self._records]}")
            module, name = self._records[index].module, self._records[index].name
            unknown = set(sides) - {"input", "output"}
            if unknown:
                raise GraphgrowError(f"unknown inner-product sides {sorted(unknown)}", node=name,
                                     hint="use the keys 'input' and 'output'")
            weight = _weight_matrix(module.weight)
            operators[index] = {}
            for side, matrix in sides.items():
                size = weight.shape[1] if side == "input" else weight.shape[0]
                matrix = torch.as_tensor(matrix, dtype=torch.float64)
                if matrix.shape != (size, size):
                    raise GraphgrowError(f"{side} inner product must be {size}x{size}, got {tuple(matrix.shape)}",
                                         node=name)
                if not torch.allclose(matrix, matrix.T, rtol=1e-10, atol=1e-12) or \
                        torch.linalg.cholesky_ex(matrix).info != 0:
                    raise GraphgrowError(f"{side} inner product is not symmetric positive definite", node=name)
                # P_in is the inner-product matrix on X itself, P_out the inverse of the one on Y (Lemma 5.2)
                operator = matrix if side == "input" else torch.cholesky_inverse(torch.linalg.cholesky(matrix))
                operators[index][side] = operator.to(weight.dtype)
        return operators

    def _check_backpack_model(self) -> None:
        from backpack.custom_module.branching import SumModule

        if any(isinstance(module, SumModule) for module in self.model.modules()):
            raise GraphgrowError("BackPACK's Kronecker-factor extensions (KFAC/KFLR) cannot back-propagate "
                                 "through branching graphs such as residual blocks",
                                 hint="use backend='hooks', which handles residual graphs")
        for record in self._records:
            if not getattr(record.module, "_backpack_extend", False):
                raise GraphgrowError("layer is not extended by BackPACK", node=record.name,
                                     hint="model = backpack.extend(model, use_converter=True) before building "
                                          "the optimizer")

    def _warn_sgd_fallback(self) -> None:
        preconditioned = {id(p) for r in self._records for p in r.module.parameters(recurse=False)}
        names = {id(p): n for n, p in self.model.named_parameters()}
        plain = [names.get(id(p), "<unnamed>") for group in self.param_groups for p in group["params"]
                 if id(p) not in preconditioned]
        if plain:
            warnings.warn(f"FrobeniusPreconditioner: plain SGD for parameters outside preconditioned layers "
                          f"(Linear, and ungrouped zero-padded Conv2d with backend='hooks'): {', '.join(plain)}",
                          stacklevel=3)

    def backpack_extensions(self) -> list:
        """The BackPACK extensions to activate around ``loss.backward()`` (backend ``"backpack"``)."""
        from backpack.extensions import KFAC, KFLR

        if self.backend != "backpack":
            raise GraphgrowError("backpack_extensions() belongs to backend='backpack'")
        return [KFAC(mc_samples=self.mc_samples) if self.labels == "sampled" else KFLR()]

    # ---------------------------------------------------------------------------------- step
    def _layout_table(self):
        """(preconditioned layers as (index, record, group), plain parameters as (param, group)),
        rebuilt only when the param groups change (add_param_group, load_state_dict): step() runs
        every iteration and these lookups are per-layer Python overhead."""
        key = tuple(map(id, self.param_groups))
        if self._layout is None or self._layout[0] != key:
            group_of = {id(p): group for group in self.param_groups for p in group["params"]}
            layers = [(index, record, group_of[id(record.module.weight)]) for index, record in enumerate(self._records)]
            preconditioned = {id(p) for r in self._records for p in r.module.parameters(recurse=False)}
            plain = [(p, group) for group in self.param_groups for p in group["params"] if id(p) not in preconditioned]
            self._layout = (key, layers, plain)
        return self._layout[1:]

    @torch.no_grad()
    def step(self, closure=None):
        """One preconditioned SGD step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layers, plain = self._layout_table()
        entry = {} if self.track_diagnostics else None
        active = []
        for index, record, group in layers:
            if record.module.weight.grad is None:
                record.clear()
            else:
                active.append((index, record, group, self.state[record.module.weight]))
        refreshed = [layer for layer in active if layer[3].get("step", 0) % self.update_interval == 0]
        if self.grad == "direction":  # the backward pass left the direction in .grad
            refreshed = []
        self._refresh(refreshed, entry)
        refreshing = {id(layer[1]) for layer in refreshed}
        updates = []
        for index, record, group, state in active:
            if self.grad == "direction":
                bias = record.module.bias
                updates.append((index, record.module, group, state, state.get("step", 0), record.module.weight.grad,
                                None if bias is None else bias.grad))
                continue
            refresh = id(record) in refreshing
            refusal = self._fast_path_refusal(index, record, state, refresh)
            self._log_path(record, refusal, refresh)
            direction = self._precondition(state, record.module, None if refusal else record, refresh)
            record.clear()
            updates.append((index, record.module, group, state, state.get("step", 0)) + direction)
        self._check_finite(updates)
        for index, module, group, state, step, weight_direction, bias_direction in updates:
            if entry is not None:
                entry.setdefault(self._records[index].name, {}).update(
                    self._norms(module, weight_direction, bias_direction))
            self._descend(module.weight, weight_direction, group)
            if bias_direction is not None:
                self._descend(module.bias, bias_direction, group)
            state["step"] = step + 1
        for param, group in plain:
            if param.grad is not None:
                self._descend(param, param.grad, group)
        if entry is not None:
            self.diagnostics.append(entry)
        return loss

    def _descend(self, param: torch.Tensor, direction: torch.Tensor, group: dict) -> None:
        """param ← (1 − lr·wd)·param − lr·d, with d the direction or, with momentum μ, the buffer
        v ← μ·v + direction (torch.optim.SGD's heavy ball, dampening 0; Nesterov: direction + μ·v).
        The weight decay is decoupled: it is not preconditioned."""
        lr, momentum = group["lr"], group["momentum"]
        if group["weight_decay"]:
            param.mul_(1 - lr * group["weight_decay"])
        if momentum:
            state = self.state[param]
            buffer = state.get("momentum_buffer")
            # out of place: a state_dict loaded into another optimizer shares its tensors with this one
            buffer = direction.clone() if buffer is None else direction.add(buffer, alpha=momentum)
            state["momentum_buffer"] = buffer
            direction = direction.add(buffer, alpha=momentum) if group["nesterov"] else buffer
        param.add_(direction, alpha=-lr)

    def _check_finite(self, updates: list) -> None:
        """Raise before any parameter changes if a preconditioned gradient is not finite. One
        synchronising check per step on the sum of all entries (a sum is several times cheaper than
        isfinite(...).all() or a max-norm); only when the sum is not finite are the entries examined,
        since finite entries can overflow a sum."""
        if not updates:
            return
        sums = [update[5].sum() for update in updates]
        if torch.isfinite(torch.stack(sums).sum()):
            return
        for update in updates:
            if not torch.isfinite(update[5]).all():
                raise GraphgrowError("non-finite preconditioned gradient (the gradient or the layer statistics "
                                     "overflowed)", node=self._records[update[0]].name,
                                     hint="training diverged; lower the learning rate")

    def _log_path(self, record: _LayerRecord, refusal: str | None, refresh: bool) -> None:
        """Log (INFO, logger graphgrow.precond.frobenius) when a layer's refresh steps, or its steps
        between refreshes, change path; ``paths[name]`` / ``paths[name + " (between refreshes)"]``."""
        key = record.name if refresh else f"{record.name} (between refreshes)"
        path = f"general ({refusal})" if refusal else "push-through" if refresh else "factors"
        if self.paths.get(key) != path:
            _LOG.info("FrobeniusPreconditioner: layer '%s' takes the %s path%s", record.name, path,
                      "" if refresh else " between refreshes")
        self.paths[key] = path

    def _precondition(self, state: dict, module: nn.Module, record: _LayerRecord | None = None,
                      refresh: bool = True):
        """P_out ∇W P_in and P_out ∇b from the current factors (5.15, Remark 5.3); the weight's
        from the gradient's factors of ``record`` if given (the fast path: on a refresh step from
        the statistics of these factors, between refreshes with the kept operators)."""
        bias_grad = None if module.bias is None else module.bias.grad
        if record is not None:
            outputs = self._gradient_outputs(record)
            if refresh:
                factors = [factor for _, factor in record.output_grads] \
                    if self.labels == "true" and self.moment == "second" else None
                direction, bias_direction = factored_direction(state, record.inputs, outputs, factors,
                                                               self.moment == "covariance", self._apply)
            else:
                direction, bias_direction = operators_on_factors(state, record.inputs, outputs, self._apply)
            if bias_grad is None:
                bias_direction = None
            elif not bias_gradient_matches(bias_grad, outputs):
                bias_direction = self._apply(state, "out", bias_grad.unsqueeze(1), from_left=True).squeeze(1)
            return direction.reshape(module.weight.shape), bias_direction
        bias_direction = None
        if bias_grad is not None:
            bias_direction = self._apply(state, "out", bias_grad.unsqueeze(1), from_left=True).squeeze(1)
        grad = _weight_matrix(module.weight.grad)
        direction = self._apply(state, "out", grad, from_left=True)
        direction = self._apply(state, "in", direction, from_left=False)
        return direction.reshape(module.weight.shape), bias_direction
