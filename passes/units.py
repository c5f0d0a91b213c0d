"""Unit coupling: which state tensors, along which axes, hold the output units of a widenable
layer (its rows, per-unit state of pass-through ops such as batchnorm, the columns of every
consumer, in blocks after a flatten), and linear maps on those units. Shared by ``widen``,
the neuron candidates of ``extend_all``, ``keep_candidates`` and the width hierarchy."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from graphgrow import GraphgrowError, LayerGraph


@dataclass(frozen=True)
class UnitAxis:
    """Axis ``axis`` of state entry ``tensor`` holds the units, ``block`` entries per unit.
    ``side``: ``rows`` (the layer's own output units), ``state`` (per-unit state of a
    pass-through op; ``fresh`` is the value of a new unit) or ``columns`` (a consumer's input)."""
    tensor: str
    axis: int
    block: int
    side: str
    fresh: float | None = None


@dataclass
class UnitCoupling:
    layer: str
    units: int
    axes: list[UnitAxis]
    consumers: list[str]

    def on(self, side: str) -> list[UnitAxis]:
        return [a for a in self.axes if a.side == side]


def layers_with_units(graph: LayerGraph) -> list[str]:
    """Layers with a width argument (linear, conv2d); ``passes.widenable`` says which of them
    ``widen`` accepts."""
    return [n.name for n in graph.nodes if n.opdef.widens(n.args)]


def trace_units(graph: LayerGraph, layer: str, state_names) -> UnitCoupling:
    """Follow the output units of ``layer`` through pass-through ops to its consumers; a
    GraphgrowError where they reach something that cannot take more units. ``state_names``
    (anything supporting ``in``: a state dict, a ``StateView``) says which entries exist."""
    try:
        node = graph.node(layer)
    except GraphgrowError as error:
        raise error.located(node=layer)
    fail = lambda message, where=layer, hint=None: GraphgrowError(
        message, file=graph.source, node=where, hint=hint)
    if not node.opdef.widens(node.args):
        raise fail(f"'{layer}' ({node.op}) has no output units to widen",
                   hint=f"layers with units: {', '.join(layers_with_units(graph)) or 'none'}")
    if len(node.out_shape) not in (1, 3):
        raise fail(f"'{layer}' has output shape {list(node.out_shape)}; units are widened on "
                   "vectors (C,) and images (C, H, W) only")
    axes = [UnitAxis(f"{layer}.{role}", out_axis, 1, "rows")
            for role, (out_axis, _) in node.opdef.widen_roles(node.args).items()
            if out_axis is not None and f"{layer}.{role}" in state_names]
    consumers: list[str] = []
    frontier = [(layer, 1)]  # (node whose output carries the units, entries per unit)
    seen = {layer}
    while frontier:
        name, block = frontier.pop()
        if name in graph.outputs:
            raise fail(f"the units of '{layer}' reach the network output '{name}'",
                       where=name, hint="the output width is fixed by the data; widen a hidden layer")
        for reader_name in graph.consumers(name):
            if reader_name in seen:
                continue
            seen.add(reader_name)
            reader = graph.node(reader_name)
            op = reader.opdef
            if op.passes_units_through and len(reader.inputs) == 1:
                axes += [UnitAxis(f"{reader_name}.{role}", 0, block, "state", fresh)
                         for role, fresh in op.unit_roles(reader.args).items()
                         if f"{reader_name}.{role}" in state_names]
                in_shape = reader.in_shapes[0]
                next_block = block * math.prod(in_shape[1:]) if len(reader.out_shape) == 1 else block
                frontier.append((reader_name, next_block))
            elif op.widens(reader.args) and _reads_units_on_axis_0(reader, block):
                consumers.append(reader_name)
                axes += [UnitAxis(f"{reader_name}.{role}", in_axis, block, "columns")
                         for role, (_, in_axis) in op.widen_roles(reader.args).items()
                         if in_axis is not None and f"{reader_name}.{role}" in state_names]
            else:
                why = f" ({op.widen_refusal})" if op.widen_refusal else ""
                raise fail(f"the units of '{layer}' flow into '{reader_name}' ({reader.op}), "
                           f"which cannot take more input units{why}", where=reader_name,
                           hint="widen layers whose output passes through elementwise ops, pooling, "
                                "dropout, batchnorm or flatten into linear or conv2d layers")
    return UnitCoupling(layer, node.args[node.opdef.width_arg], axes, consumers)


def _reads_units_on_axis_0(reader, block: int) -> bool:
    """The consumer's input units are the first per-sample dimension, which carries the
    widened units (in blocks only on vectors, after a flatten)."""
    rank = len(reader.in_shapes[0])
    return reader.opdef.input_units_dim % rank == 0 and (rank == 1 or block == 1)


class StateView(Mapping):
    """Read access to a module's state entries by state-dict name, without the walk over the
    whole module that ``state_dict()`` does (it dominates a pass on a long chain)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __getitem__(self, name: str) -> torch.Tensor:
        owner, _, attr = name.rpartition(".")
        try:
            submodule = self.module.get_submodule(owner)
        except AttributeError:
            raise KeyError(name) from None
        tensor = submodule._parameters.get(attr, submodule._buffers.get(attr))
        if tensor is None or attr in getattr(submodule, "_non_persistent_buffers_set", ()):
            raise KeyError(name)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.module.state_dict())

    def __len__(self) -> int:
        return len(self.module.state_dict())


# -- linear maps on units ----------------------------------------------------------------------

def map_units(tensor: torch.Tensor, axis: int, block: int, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` (new units x old units) applied to the units of ``tensor`` along ``axis``."""
    shape = tuple(tensor.shape)
    units = shape[axis] // block
    split = tensor.reshape(*shape[:axis], units, block, *shape[axis + 1:])
    # the map is planned on the CPU; it is inspected there and applied where the tensor lives
    if bool(((matrix != 0).sum(1) <= 1).all()):
        # selections and scaled copies (widen, keep): gather, so that copies are exact and cheap
        index = matrix.abs().argmax(1)
        scale = matrix.gather(1, index[:, None]).reshape(-1, *[1] * (split.dim() - axis - 1)).to(tensor)
        mapped = split.index_select(axis, index.to(tensor.device)) * scale
    else:
        mapped = (split.movedim(axis, -1) @ matrix.to(tensor).T).movedim(-1, axis)
    return mapped.reshape(*shape[:axis], matrix.shape[0] * block, *shape[axis + 1:])


TensorFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class UnitMap:
    """One linear map on the units of one axis, plus the values of fresh units (``fresh``
    gives the full new tensor's additive part; optimizer state gets no fresh part)."""
    axis: int
    block: int
    matrix: torch.Tensor
    fresh: TensorFn | None = None

    def value(self, tensor: torch.Tensor) -> torch.Tensor:
        mapped = map_units(tensor, self.axis, self.block, self.matrix)
        return mapped + self.fresh(mapped) if self.fresh else mapped

    def state(self, tensor: torch.Tensor) -> torch.Tensor:
        return map_units(tensor, self.axis, self.block, self.matrix)


def composed(maps: list[UnitMap], part: str) -> TensorFn:
    """The tensor function applying ``maps`` in order (``part``: 'value' or 'state')."""
    def apply(tensor: torch.Tensor) -> torch.Tensor:
        for unit_map in maps:
            tensor = getattr(unit_map, part)(tensor)
        return tensor
    return apply


def fresh_units(start: int, block: int, axis: int, fill: Callable[[tuple], torch.Tensor]) -> TensorFn:
    """Additive part that puts ``fill(shape of the new part)`` on units ``start...`` of ``axis``."""
    def values(mapped: torch.Tensor) -> torch.Tensor:
        extra = torch.zeros_like(mapped)
        part = extra.narrow(axis, start * block, mapped.shape[axis] - start * block)
        part.copy_(fill(tuple(part.shape)).to(part))  # drawn on the CPU from a seed: same values on any device
        return extra
    return values


def keep_units(units: int, keep: list[int]) -> torch.Tensor:
    """Selection matrix keeping units ``keep`` (in that order) of ``units``."""
    matrix = torch.zeros(len(keep), units, dtype=torch.float64)
    matrix[torch.arange(len(keep)), torch.tensor(keep, dtype=torch.long)] = 1.0
    return matrix
