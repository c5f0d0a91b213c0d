"""How the preconditioner records its statistics with the hooks backend: a forward hook per
layer keeps the layer inputs and puts a tensor hook on the output for the back-propagated
pre-activation gradients; a post-accumulate-grad hook notes the grad tensor autograd left (for the
fast path's check); for Monte-Carlo labels a hook on the model output back-propagates sampled
labels re-entrantly while the graph is alive."""
from __future__ import annotations

import math

import torch
from torch import nn

from .direction import uninstall as uninstall_direction_forwards
from .factors import _flat_inputs, _flat_output_grads, _LayerRecord


class _Recording:
    """Mixin of FrobeniusPreconditioner: the hooks of the ``"hooks"`` backend."""

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
        uninstall_direction_forwards(self._records)

    def _refresh_due(self, record: _LayerRecord) -> bool:
        return self.state[record.module.weight].get("step", 0) % self.update_interval == 0

    def _layer_hook(self, record: _LayerRecord):
        def hook(module, inputs, output):
            # a deepcopy of the model carries this hook along; only the original layer may record
            if module is not record.module or self._sampling or not torch.is_grad_enabled() \
                    or not output.requires_grad:
                return
            # between refreshes the factors serve the fast path only (pushthrough.operators_on_factors)
            due = self._refresh_due(record)
            if not due and not self.fast_path:
                return
            layer_input = inputs[0].detach()
            if not record.inputs:
                record.grad_was_none = module.weight.grad is None
            record.inputs.append(_flat_inputs(module, layer_input))
            batch_size = layer_input.shape[0]
            if self.labels == "sampled" and due:  # Monte-Carlo samples only for a refresh
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
