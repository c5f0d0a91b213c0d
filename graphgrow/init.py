"""Named parameter initialisations a spec can ask for with `init:`.

`init: zeros` applies to every role of the node; `init: {weight: identity, bias: zeros}` names
roles; `init: {normal: {std: 0.1}}` takes options. `default` is the op's own initialisation.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .errors import GraphgrowError, did_you_mean


def _zeros(tensor, generator, **_):
    tensor.zero_()


def _identity(tensor, generator, **_):
    if tensor.dim() != 2:
        raise GraphgrowError(f"'identity' needs a matrix, this parameter has shape {list(tensor.shape)}",
                             hint="use 'dirac' for conv kernels and 'zeros' for biases")
    torch.nn.init.eye_(tensor)


def _dirac(tensor, generator, **_):
    if tensor.dim() != 4 or tensor.shape[0] != tensor.shape[1] or tensor.shape[2] % 2 == 0:
        raise GraphgrowError(f"'dirac' needs a square conv kernel (C, C, k, k) with odd k, "
                             f"this parameter has shape {list(tensor.shape)}")
    dirac_(tensor)


def dirac_(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.nn.init.dirac_`` for one group: channel i passes to channel i through the kernel's
    centre. In one strided write (torch's sets the entries one by one from Python, 20x slower at
    32 channels, most of inserting an identity conv)."""
    with torch.no_grad():
        tensor.zero_()
        tensor[:, :, tensor.shape[2] // 2, tensor.shape[3] // 2].fill_diagonal_(1)
    return tensor


def _normal(tensor, generator, std=1.0, mean=0.0):
    tensor.normal_(mean, std, generator=generator)


def _check_normal(options: Any) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict) or set(options) - {"std", "mean"} or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in options.values()):
        raise GraphgrowError(f"normal takes {{std: number, mean: number}}, got {options!r}")
    if not all(math.isfinite(v) for v in options.values()):
        raise GraphgrowError(f"normal std and mean must be finite, got {options!r}")
    if options.get("std", 1.0) < 0:
        raise GraphgrowError("normal std must not be negative")
    return {k: float(v) for k, v in options.items()}


INITIALIZERS: dict[str, Callable] = {"zeros": _zeros, "identity": _identity, "dirac": _dirac,
                                     "normal": _normal}
OPTION_CHECKS = {"normal": _check_normal}
NAMES = ("default", *INITIALIZERS)


def _one(value: Any) -> tuple[str, dict] | None:
    """Normalise one initialiser: 'zeros' or {normal: {std: 0.1}} -> (name, options)."""
    if isinstance(value, str):
        name, options = value, None
    elif isinstance(value, dict) and len(value) == 1:
        (name, options), = value.items()
    else:
        return None
    if name not in NAMES:
        raise GraphgrowError(f"unknown init '{name}'", hint=did_you_mean(name, NAMES) or
                             f"known: {', '.join(NAMES)}")
    check = OPTION_CHECKS.get(name)
    if check is None and options is not None:
        raise GraphgrowError(f"init '{name}' takes no options")
    return name, (check(options) if check else {})


def normalize_init(value: Any, roles: list[str]) -> dict[str, tuple[str, dict]]:
    """Turn a spec `init:` value into {role: (initializer, options)} for the given roles."""
    if value is None:
        return {}
    whole = None
    # a one-key mapping naming an initialiser ({normal: {std: 0.1}}) applies to every role;
    # any other mapping names roles, so a role the node lacks is reported as such
    if not isinstance(value, dict) or (len(value) == 1 and not set(value) & set(roles)
                                       and set(value) <= set(NAMES)):
        whole = _one(value)
    if whole is not None:
        return {role: whole for role in roles}
    if not isinstance(value, dict):
        raise GraphgrowError(f"bad init {value!r}", hint="e.g. init: zeros or init: {weight: identity}")
    plan = {}
    for role, item in value.items():
        if role not in roles:
            raise GraphgrowError(f"init names role '{role}' which this node does not have",
                                 hint=(f"'{role}' is an initializer: use it alone or under a role"
                                       if role in NAMES else did_you_mean(role, [*roles, *NAMES]))
                                 or f"roles: {', '.join(roles) or 'none'}")
        one = _one(item)
        if one is None:
            raise GraphgrowError(f"bad init for role '{role}': {item!r}")
        plan[role] = one
    return plan


def apply_init(parameters: dict[str, torch.Tensor], plan: dict[str, tuple[str, dict]],
               generator: torch.Generator) -> None:
    """Apply a normalised init plan to a node's parameters (by role)."""
    with torch.no_grad():
        for role, (name, options) in plan.items():
            if name != "default":
                INITIALIZERS[name](parameters[role], generator, **options)
