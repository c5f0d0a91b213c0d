"""The Frobenius-type layer-wise preconditioner (thesis chapter 5) as a torch optimizer, its
diagnostics, and its entry as ``optimizer="frobenius"`` of the trainer (registered through the
``graphgrow.optimizers`` entry point in pyproject.toml)."""
from __future__ import annotations

from ..runtime.optimizers import OptimizerKind
from .frobenius import FrobeniusPreconditioner

__all__ = ["FrobeniusPreconditioner", "OPTIMIZER"]


def _build(module, parameters, config) -> FrobeniusPreconditioner:
    return FrobeniusPreconditioner(module, parameters, lr=config.lr, damping_in=config.damping,
                                   damping_out=config.damping, momentum=config.momentum,
                                   nesterov=config.nesterov, weight_decay=config.weight_decay)


def _release(optimizer: FrobeniusPreconditioner) -> None:
    optimizer.remove_hooks()


#: ``optimizer="frobenius"``: per-batch estimates with ``damping`` as both γ1 and γ2, the config's
#: momentum/nesterov and its weight decay (decoupled); its statistics belong to the layers, so a
#: grown network gets a fresh preconditioner.
OPTIMIZER = OptimizerKind(_build, carries_state=False, release=_release)
