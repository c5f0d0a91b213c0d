"""Carry a torch optimizer (and so any LR scheduler holding it) across a pass."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from .record import Origin, Record


def transfer_optimizer(optimizer: torch.optim.Optimizer, old_module: nn.Module, new_module: nn.Module,
                       record: Record) -> torch.optim.Optimizer:
    """Rewire ``optimizer`` in place to the parameters of ``new_module``: param groups and
    hyperparameters stay; carried parameters keep their state, new ones start with empty
    (zero) state, derived ones get state derived like their values (docs/passes.md)."""
    old_params = dict(old_module.named_parameters())
    old_names = {id(p): name for name, p in old_params.items()}
    group_of = {}
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if id(param) in old_names:
                group_of[old_names[id(param)]] = index
    new_groups: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
    new_state = defaultdict(dict)
    for name, param in new_module.named_parameters():
        if not param.requires_grad:
            continue
        origin = record.origins.get(name)
        sources = [s for s in (origin.sources if origin else ()) if s in group_of]
        if sources:
            group = group_of[sources[0]]
        else:  # a new parameter joins a parameter of its own node, else the first group
            node = name.rsplit(".", 1)[0].split(".")[0]
            group = next((group_of[n] for n in group_of if n.split(".")[0] == node), 0)
        new_groups[group].append(param)
        if origin is None or origin.kind == "new" or not sources:
            continue
        states = [optimizer.state.get(old_params[s], {}) for s in sources]
        if not states[0]:
            continue
        for key, value in states[0].items():
            shaped = (isinstance(value, torch.Tensor) and value.dim() > 0
                      and tuple(value.shape) == tuple(old_params[sources[0]].shape))
            if shaped:
                new_state[param][key] = record.derive_state(name, [st[key] for st in states]).to(param.dtype)
            else:  # step counters and other scalars
                new_state[param][key] = value.clone() if isinstance(value, torch.Tensor) else value
    for group, params in zip(optimizer.param_groups, new_groups):
        group["params"] = params
    optimizer.state = new_state
    return optimizer


def _embed_leading(shape: torch.Size) -> Callable[[torch.Tensor], torch.Tensor]:
    def embed(old: torch.Tensor) -> torch.Tensor:
        grown = old.new_zeros(shape)
        grown[tuple(slice(0, s) for s in old.shape)] = old
        return grown
    return embed


def record_by_name(old_module: nn.Module, new_module: nn.Module,
                   source: Callable[[str, torch.Tensor], str | None] | dict | None = None) -> Record:
    """A record for a network changed outside the passes: a parameter comes from the old
    parameter named ``source`` (a dict new name -> old name, or a function (name, parameter) ->
    old name or None; default: the same name). Same shape: carried; every dimension at least the
    old one: derived, the old values in the leading corner and zeros elsewhere (where widening
    puts them); otherwise, or without a source, the parameter is new and its state starts empty."""
    old_params = dict(old_module.named_parameters())
    record = Record("by-name")
    for name, param in new_module.named_parameters():
        old_name = source.get(name) if isinstance(source, dict) else source(name, param) if source else name
        old = old_params.get(old_name) if old_name is not None else None
        if old is None or old.dim() != param.dim() or any(o > n for o, n in zip(old.shape, param.shape)):
            continue
        if old.shape == param.shape:
            record.origins[name] = Origin.carried(old_name)
        else:
            record.origins[name] = Origin.derived([old_name], _embed_leading(param.shape))
    return record
