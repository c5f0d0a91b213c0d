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
"""
from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn

from graphgrow.errors import GraphgrowError

from .factors import (_conv_supported, _flat_inputs, _flat_output_grads, _inner_inverse64, _isotropic_start,
                      _LayerRecord, _Pending, _spd_inverses, _weight_matrix)
from .pushthrough import bias_gradient_matches, factored_direction, gradient_matches_factors

_LOG = logging.getLogger(__name__)

MOMENTS = ("second", "covariance")
LABEL_SOURCES = ("true", "sampled", "expected")
ESTIMATES = ("batch", "ema", "ema_inverse")
BACKENDS = ("hooks", "backpack")
_MAX_DAMPING_RAISES = 12


class FrobeniusPreconditioner(torch.optim.Optimizer):
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
        track_diagnostics: record gradient norms (Euclidean and Frobenius-type) every step and the
            covariance spectra every ``spectrum_interval``-th refresh, in ``self.diagnostics`` (one
            dict per step: ``{layer: {"euclidean_norm", "frobenius_norm", "in_spectrum", "out_spectrum"}}``).
    """

    def __init__(self, model: nn.Module, params=None, *, lr: float = 0.1, damping_out: float = 0.01,
                 damping_in: float = 0.01, beta: float = 0.1, moment: str = "second", labels: str = "true",
                 loss: nn.Module | None = None, mc_samples: int = 1, estimate: str = "batch",
                 update_interval: int = 1, woodbury="auto", inner_products: dict | None = None,
                 backend: str = "hooks", track_diagnostics: bool = False, spectrum_interval: int = 10,
                 fast_path: bool = True, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        self._check_options(moment, labels, loss, mc_samples, estimate, update_interval, woodbury, backend,
                            lr, damping_out, damping_in, beta)
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
        self.fast_path = fast_path
        self.paths: dict[str, str] = {}  # layer name: the path its last refresh step took
        self.diagnostics: list[dict] = []
        self._records = self._find_layers(model)
        self._inner_products = self._check_inner_products(inner_products or {})
        self._sampling = False
        self._hook_handles = []
        self._layout = None
        if backend == "hooks":
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
        records = []
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or id(module.weight) not in owned:
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

    # ------------------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> None:
        for record in self._records:
            self._hook_handles.append(record.module.register_forward_hook(self._layer_hook(record)))
            self._hook_handles.append(record.module.weight.register_post_accumulate_grad_hook(
                self._accumulation_hook(record)))
        if self.labels == "sampled":
            # a plain closure, not a bound method: deepcopy of the model would copy a bound method's optimizer
            def on_model_output(model, inputs, output):
                self._on_model_output(model, inputs, output)
            self._hook_handles.append(self.model.register_forward_hook(on_model_output))

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (it stops recording statistics)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    def _refresh_due(self, record: _LayerRecord) -> bool:
        return self.state[record.module.weight].get("step", 0) % self.update_interval == 0

    def _layer_hook(self, record: _LayerRecord):
        def hook(module, inputs, output):
            # a deepcopy of the model carries this hook along; only the original layer may record
            if module is not record.module or self._sampling or not torch.is_grad_enabled() \
                    or not output.requires_grad or not self._refresh_due(record):
                return
            layer_input = inputs[0].detach()
            if not record.inputs:
                record.grad_was_none = module.weight.grad is None
            record.inputs.append(_flat_inputs(module, layer_input))
            batch_size = layer_input.shape[0]
            if self.labels == "sampled":
                record.outputs.append((output, batch_size))

            def store_grad(grad):
                if self._sampling:
                    return
                rows = _flat_output_grads(module, grad.detach(), batch_size)
                if self.labels == "sampled":
                    record.gradient_outputs.append(rows[0])
                else:
                    record.output_grads.append(rows)
            output.register_hook(store_grad)
        return hook

    @staticmethod
    def _accumulation_hook(record: _LayerRecord):
        def hook(weight):
            record.accumulated = (id(weight.grad), weight.grad._version)
        return hook

    def _on_model_output(self, model, inputs, output):
        if model is not self.model or self._sampling or not torch.is_tensor(output) or not output.requires_grad:
            return
        live = [r for r in self._records if r.outputs]
        if live:
            output.register_hook(lambda grad: self._monte_carlo_backprop(output, live))

    def _sample_output_grads(self, output: torch.Tensor) -> torch.Tensor:
        """d loss(output, y~p(y|output)) / d output for labels drawn from the predictive distribution."""
        logits = output.detach().requires_grad_(True)
        with torch.no_grad():
            if isinstance(self.loss, nn.CrossEntropyLoss):
                class_dim = 1 if logits.dim() > 1 else 0
                drawn = torch.distributions.Categorical(logits=logits.movedim(class_dim, -1)).sample()
            else:
                # MSELoss(mean) is the Gaussian negative log-likelihood with variance D/2 per datum
                per_datum = logits[0].numel() if logits.dim() > 1 else 1
                drawn = logits + math.sqrt(per_datum / 2) * torch.randn_like(logits)
        with torch.enable_grad():
            return torch.autograd.grad(self.loss(logits, drawn), logits)[0]

    def _monte_carlo_backprop(self, output: torch.Tensor, live: list[_LayerRecord]) -> None:
        # runs inside the main backward (re-entrantly) while the graph is still alive; the output's
        # own hook fires again during the re-entrant pass and must not recurse
        if self._sampling:
            return
        self._sampling = True
        try:
            for _ in range(self.mc_samples):
                grads = torch.autograd.grad(output, [r.outputs[-1][0] for r in live],
                                            grad_outputs=self._sample_output_grads(output),
                                            retain_graph=True, allow_unused=True)
                for record, grad in zip(live, grads):
                    if grad is not None:
                        batch_size = record.outputs[-1][1]
                        record.output_grads.append(_flat_output_grads(record.module, grad, batch_size))
        finally:
            self._sampling = False
            for record in live:
                record.outputs.clear()

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
        self._refresh(refreshed, entry)
        refreshing = {id(layer[1]) for layer in refreshed}
        updates = []
        for index, record, group, state in active:
            fast = False
            if id(record) in refreshing:  # between refreshes the gradient is not that of the recorded samples
                refusal = self._fast_path_refusal(index, record, state)
                self._log_path(record, refusal)
                fast = refusal is None
            direction = self._precondition(state, record.module, record if fast else None)
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

    def _fast_path_refusal(self, index: int, record: _LayerRecord, state: dict) -> str | None:
        """Why this refresh step's weight direction cannot come from the gradient's factors
        (pushthrough.py), or None when it can: the batch estimate of the hooks backend, and a
        ``.grad`` that is exactly what autograd accumulated from the recorded passes."""
        if not self.fast_path:
            return "fast_path=False"
        if self.backend != "hooks" or self.estimate != "batch" or index in self._inner_products:
            return "the fast path needs batch estimates of the hooks backend on both sides"
        if "out_operator" in state and "in_operator" in state:
            return "both factors are dense (at least as many samples as features): P_out ∇W P_in is cheaper"
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

    def _log_path(self, record: _LayerRecord, refusal: str | None) -> None:
        """Log (INFO, logger graphgrow.precond.frobenius) when a layer's refresh steps change path."""
        path = "push-through" if refusal is None else f"general ({refusal})"
        if self.paths.get(record.name) != path:
            _LOG.info("FrobeniusPreconditioner: layer '%s' takes the %s path", record.name, path)
        self.paths[record.name] = path

    def _precondition(self, state: dict, module: nn.Module, record: _LayerRecord | None = None):
        """P_out ∇W P_in and P_out ∇b from the current factors (5.15, Remark 5.3); the weight's
        from the gradient's factors of ``record`` if given (the fast path)."""
        bias_grad = None if module.bias is None else module.bias.grad
        if record is not None:
            outputs = self._gradient_outputs(record)
            factors = [factor for _, factor in record.output_grads] \
                if self.labels == "true" and self.moment == "second" else None
            direction, bias_direction = factored_direction(state, record.inputs, outputs, factors,
                                                           self.moment == "covariance", self._apply)
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

    # ------------------------------------------------------------------------------- refresh
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
                refreshes = state.get("step", 0) // self.update_interval
                if entry is not None and refreshes % self.spectrum_interval == 0:
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
        stacked.diagonal(dim1=-2, dim2=-1).add_(torch.tensor([[item.damping] for item in items],
                                                              dtype=stacked.dtype, device=stacked.device))
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

    # --------------------------------------------------------------------------- diagnostics
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
