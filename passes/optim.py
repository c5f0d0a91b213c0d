"""Carry a torch optimizer (and so any LR scheduler holding it) across a pass."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .record import Record


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
