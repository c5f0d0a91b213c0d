"""Devices and floating-point types by name, as the command line and the one-call engines take
them: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``float32``,
``float64``. An unavailable device is a GraphgrowError naming the option."""
from __future__ import annotations

import re

import torch

from ..errors import GraphgrowError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The torch device ``name`` stands for; None and ``auto``: the first CUDA device when one
    is available, else the CPU."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            raise GraphgrowError(f"--device {name}: CUDA is not available on this machine",
                                 hint="use --device cpu (or auto, which takes CUDA only where it is available)")
        index = int(match.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise GraphgrowError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                                 hint=f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise GraphgrowError("--device mps: the Apple MPS backend is not available on this machine",
                                 hint="use --device cpu")
        return torch.device("mps")
    raise GraphgrowError(f"unknown device {name!r}", hint=f"use one of {', '.join(DEVICES)}")


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype ``name`` stands for (None: leave the network's as it is)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise GraphgrowError(f"unknown dtype {name!r}", hint=f"use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def place_network(network, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """``network`` moved (in place) to ``device`` and cast to ``dtype``, each by name; None
    leaves it as it is. Returns the network."""
    if device is None and dtype is None:
        return network
    return network.to(None if device is None else resolve_device(device), resolve_dtype(dtype))
