"""The optimizers the trainer builds by name.

``sgd`` and ``adam`` are built in. Engines that bring an optimizer (the Frobenius-type
preconditioner) register it under the entry-point group ``graphgrow.optimizers`` in their
package metadata, so the runtime finds them by name without importing the engine layer; a user
can add one the same way, or in-process with :func:`register_optimizer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

import torch

from ..errors import GraphgrowError

ENTRY_POINT_GROUP = "graphgrow.optimizers"


def _no_misfit(config) -> tuple[str, str] | None:
    return None


def _nothing_to_release(optimizer: torch.optim.Optimizer) -> None:
    return None


@dataclass(frozen=True)
class OptimizerKind:
    """What the trainer knows about an optimizer it builds by name. ``build(module, parameters,
    config)`` makes one; ``misfit(config)`` returns (message, hint) for a training config it
    cannot honour, else None; ``carries_state`` is False for optimizers whose state is tied to
    the layers (rebuilt after a structural change, after ``release(optimizer)``)."""
    build: Callable[[torch.nn.Module, Any, Any], torch.optim.Optimizer]
    misfit: Callable[[Any], tuple[str, str] | None] = _no_misfit
    carries_state: bool = True
    release: Callable[[torch.optim.Optimizer], None] = _nothing_to_release


def _sgd(module, parameters, config) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov)


def _adam(module, parameters, config) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


_KINDS: dict[str, OptimizerKind] = {"sgd": OptimizerKind(_sgd), "adam": OptimizerKind(_adam)}


def register_optimizer(name: str, kind: OptimizerKind) -> None:
    """Make ``name`` an optimizer the trainer (and ``--optimizer``) can build."""
    _KINDS[name] = kind


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {entry.name: entry for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def optimizer_names() -> list[str]:
    return sorted(set(_KINDS) | set(_entry_points()))


def optimizer_kind(name: str) -> OptimizerKind:
    """The registered optimizer ``name``; loads it from its entry point on first use."""
    if name not in _KINDS:
        entry = _entry_points().get(name)
        if entry is None:
            raise GraphgrowError(f"training setting: unknown optimizer '{name}'", option="optimizer",
                                 hint=f"use one of {', '.join(optimizer_names())} (installed packages add "
                                      f"more through the '{ENTRY_POINT_GROUP}' entry point)")
        _KINDS[name] = entry.load()
    return _KINDS[name]


def make_optimizer(module: torch.nn.Module, parameters, config) -> torch.optim.Optimizer:
    """The optimizer of ``config`` over ``parameters`` of ``module`` (a preconditioner records
    its statistics with hooks on the module's layers)."""
    return optimizer_kind(config.optimizer).build(module, parameters, config)
