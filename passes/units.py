"""Unit coupling: which state tensors, along which axes, hold the output units of a widenable
layer (its rows, per-unit state of pass-through ops such as batchnorm, the columns of every
consumer, in blocks after a flatten), and linear maps on those units. Shared by ``widen``,
the neuron candidates of ``extend_all``, ``keep_candidates`` and the width hierarchy."""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
from torch import nn

from graphgrow import GraphgrowError, LayerGraph


@dataclass(frozen=True)
class UnitAxis:
    """Axis ``axis`` of state entry ``tensor`` holds the units, ``block`` entries per unit.
    ``side``: ``rows`` (output units of a layer of the group), ``state`` (per-unit state of a
    pass-through op; ``fresh`` is the value of a new unit) or ``columns`` (a consumer's input).
    ``before``: per copy of the group's units on the axis, how many other units precede it
    (after a concat the axis also holds other units, and a group reaching a concat through two
    inputs sits there twice); counted without the group's own units, so it holds at any width."""
    tensor: str
    axis: int
    block: int
    side: str
    fresh: float | None = None
    before: tuple[int, ...] = (0,)


@dataclass
class UnitCoupling:
    """A coupled group: the units of ``layer`` and everything tied to them. ``producers`` are the
    layers whose width argument counts the units (several where an ``add`` or a residual stream
    ties layers together); ``consumers`` read them as input columns."""
    layer: str
    units: int
    axes: list[UnitAxis]
    consumers: list[str]
    producers: list[str]

    def on(self, side: str) -> list[UnitAxis]:
        return [a for a in self.axes if a.side == side]


def layers_with_units(graph: LayerGraph) -> list[str]:
    """Layers with a width argument (linear, conv2d); ``passes.widenable`` says which of them
    ``widen`` accepts."""
    return [n.name for n in graph.nodes if n.opdef.widens(n.args)]


def trace_units(graph: LayerGraph, layer: str, state_names) -> UnitCoupling:
    """The coupled group of the output units of ``layer`` (a linear/conv2d layer or a residual
    block): the layers that produce them, pass-through ops, ops that tie several inputs to one
    set of units (add, residual blocks: followed backwards too), concats (the units at an
    offset) and the consumers. A GraphgrowError names the node where the units reach something
    that cannot take more of them. ``state_names`` (anything supporting ``in``: a state dict,
    a ``StateView``) says which state entries exist."""
    try:
        node = graph.node(layer)
    except GraphgrowError as error:
        raise error.located(node=layer)
    fail = lambda message, where=layer, hint=None: GraphgrowError(
        message, file=graph.source, node=where, hint=hint)
    if node.opdef.head_arg is not None:
        return _head_coupling(node, state_names)
    if not node.opdef.widens(node.args) and not node.opdef.ties_units:
        raise fail(f"'{layer}' ({node.op}) has no output units to widen",
                   hint=f"layers with units: {', '.join(layers_with_units(graph)) or 'none'}")
    carriers = _carriers(graph, layer, fail)
    return _place(graph, layer, carriers, state_names, fail)


def _head_coupling(node, state_names) -> UnitCoupling:
    """The heads of an attention layer as units: head_dim entries each, on the rows of the
    query, key and value projections (three copies of the heads, stacked) and on the columns
    of the output projection. The layer is producer and consumer; its output width (the
    tokens') does not change, so nothing outside it is tied to the heads."""
    op = node.opdef
    block = op.head_dim(node.args, node.in_shapes)
    axes = [UnitAxis(f"{node.name}.{role}", axis, block, side, before=(0,) * copies)
            for role, (axis, copies, side) in op.head_roles(node.args, node.in_shapes).items()
            if f"{node.name}.{role}" in state_names]
    return UnitCoupling(node.name, node.args[op.head_arg], axes, [node.name], [node.name])


def set_units(graph: LayerGraph, coupling: UnitCoupling, units: int) -> None:
    """Set the width argument of the group's producing layers to ``units`` (for attention the
    number of heads, with their width made explicit)."""
    for producer in coupling.producers:
        node = graph.node(producer)
        op = node.opdef
        if op.head_arg is not None:
            node.args = {**node.args, op.head_arg: units, "head_dim": op.head_dim(node.args, node.in_shapes)}
        else:
            node.args = {**node.args, op.width_arg: units}


def _carriers(graph: LayerGraph, layer: str, fail) -> set[str]:
    """Nodes whose whole output is the group's units: forwards through pass-through ops, ops
    that tie units and into add/residual; backwards from those to the producing layers."""
    carriers: set[str] = set()
    todo = [layer]
    while todo:
        name = todo.pop()
        if name in carriers:
            continue
        carriers.add(name)
        node = graph.node(name)
        if name in graph.outputs:
            raise fail(f"the units of '{layer}' reach the network output '{name}'", where=name,
                       hint="the output width is fixed by the data; widen a hidden layer")
        if not node.opdef.widens(node.args):  # the inputs hold the same units: follow them back
            for source in node.inputs:
                if source == "input":
                    raise fail(f"the units of '{layer}' are tied to the network input at '{name}'",
                               where=name, hint="the input width is fixed by the data")
                op = graph.node(source).opdef
                if not (op.widens(graph.node(source).args) or op.ties_units or
                        op.passes_units_through and len(graph.node(source).inputs) == 1):
                    raise fail(f"the units of '{layer}' are tied at '{name}' to the output of '{source}' "
                               f"({op.name}), which cannot take more units", where=source)
                todo.append(source)
        for reader_name in graph.consumers(name):
            reader = graph.node(reader_name)
            op = reader.opdef
            if op.ties_units or op.passes_units_through and len(reader.inputs) == 1:
                todo.append(reader_name)
            elif not op.widens(reader.args) and op.input_unit_offsets(reader.args, reader.in_shapes) is None:
                raise _refusal(reader, layer, fail)
    return carriers


def _refusal(reader, layer: str, fail) -> GraphgrowError:
    why = f" ({reader.opdef.widen_refusal})" if reader.opdef.widen_refusal else ""
    return fail(f"the units of '{layer}' flow into '{reader.name}' ({reader.op}), which cannot take more "
                f"input units{why}", where=reader.name,
                hint="units pass through elementwise ops, pooling, dropout, batchnorm, flatten, add, "
                     "residual blocks and concat (along the first dimension) into linear or conv2d layers")


def _place(graph: LayerGraph, layer: str, carriers: set[str], state_names, fail) -> UnitCoupling:
    """Walk the graph in order: blocks, offsets and dimension of the group's units at every node
    that holds them, and the tensor axes they occupy."""
    placed: dict[str, tuple[int, tuple[int, ...], int]] = {}  # node -> (entries per unit, offsets, dim)
    axes: list[UnitAxis] = []
    producers, consumers = [], []
    roles = lambda node, side, block, offsets=(0,): [
        UnitAxis(f"{node.name}.{role}", axis_pair[side], block, "rows" if side == 0 else "columns",
                 before=offsets)
        for role, axis_pair in node.opdef.widen_roles(node.args).items()
        if axis_pair[side] is not None and f"{node.name}.{role}" in state_names]
    for node in graph.nodes:
        op, name = node.opdef, node.name
        sources = [s for s in node.inputs if s in placed]
        if op.widens(node.args) and sources:  # a consumer: its columns
            block, offsets, dim = placed[sources[0]]
            if len(sources) != 1 or not _reads_units(node, block, dim):
                raise _refusal(node, layer, fail)
            consumers.append(name)
            axes += roles(node, 1, block, offsets)
        if name in carriers:
            if op.widens(node.args):
                dim = _output_units_dim(node)
                if dim is None:
                    raise fail(f"'{name}' has output shape {list(node.out_shape)}; units are widened on "
                               "vectors (C,), images (C, H, W) and the features of tokens (N, D) only",
                               where=name)
                producers.append(name)
                axes += roles(node, 0, 1)
                placed[name] = (1, (0,), dim)
                continue
            layouts = {placed[s][0::2] for s in node.inputs}
            if len(layouts) != 1:
                raise fail(f"'{name}' ties units laid out in different blocks or dimensions "
                           f"{sorted(layouts)}", where=name)
            block, dim = layouts.pop()
            if dim and not (op.ties_units or op.passes_units_anywhere):
                raise _refusal(node, layer, fail)
            block = _block_after(node, block)
            if op.ties_units:
                axes += roles(node, 0, block) + roles(node, 1, block)
            axes += _state_axes(node, block, (0,), state_names)
            placed[name] = (block, (0,), dim)
        elif sources and not op.widens(node.args):
            starts = op.input_unit_offsets(node.args, node.in_shapes)
            if starts is not None:  # concat: each placed input's units at its start
                if {placed[s][0::2] for s in sources} != {(1, 0)}:  # flattened units: blocks need not align
                    raise _refusal(node, layer, fail)
                offsets = tuple(sorted(start + o for source, start in zip(node.inputs, starts)
                                       if source in placed for o in placed[source][1]))
                placed[name] = (1, offsets, 0)
            elif op.passes_units_through and len(node.inputs) == 1 and (op.passes_units_anywhere
                                                                        or not placed[sources[0]][2]):
                block, offsets, dim = placed[sources[0]]
                block = _block_after(node, block)
                axes += _state_axes(node, block, offsets, state_names)
                placed[name] = (block, offsets, dim)
            else:  # concatenated units reaching add, a residual block or another op
                raise _refusal(node, layer, fail)
            if name in graph.outputs:
                raise fail(f"the units of '{layer}' reach the network output '{name}'", where=name,
                           hint="the output width is fixed by the data; widen a hidden layer")
    widths = {graph.node(p).args[graph.node(p).opdef.width_arg] for p in producers}
    if len(widths) != 1:
        raise fail(f"the layers {', '.join(producers)} are tied to one set of units but have "
                   f"widths {sorted(widths)}")
    units = widths.pop()
    # offsets -> other units before each copy (k copies of the group precede copy k)
    axes = [replace(a, before=tuple(o - k * units for k, o in enumerate(a.before))) for a in axes]
    return UnitCoupling(layer, units, axes, consumers, producers)


def _output_units_dim(node) -> int | None:
    """The per-sample dimension of a widenable layer's output that holds its units, the one it
    reads its input units from (a conv2d's channels, a linear layer's last dimension): the
    first of a vector or an image, or the features of tokens (N, D); None elsewhere (a linear
    layer on images acts on their width)."""
    rank = len(node.out_shape)
    dim = node.opdef.input_units_dim % rank
    return dim if (dim == 0 and rank in (1, 3)) or (dim == 1 and rank == 2) else None


def _block_after(node, block: int) -> int:
    """Entries per unit at the output of a pass-through op (flatten turns a channel into H*W)."""
    in_shape = node.in_shapes[0]
    return block * math.prod(in_shape[1:]) if len(node.out_shape) == 1 else block


def _state_axes(node, block: int, offsets, state_names) -> list[UnitAxis]:
    return [UnitAxis(f"{node.name}.{role}", 0, block, "state", fresh, offsets)
            for role, fresh in node.opdef.unit_roles(node.args).items()
            if f"{node.name}.{role}" in state_names]


def _reads_units(reader, block: int, dim: int) -> bool:
    """The consumer's input units are the per-sample dimension ``dim`` that carries the widened
    units (in blocks only on vectors, after a flatten)."""
    rank = len(reader.in_shapes[0])
    return reader.opdef.input_units_dim % rank == dim and (rank == 1 or block == 1)


class StateView(Mapping):
    """Read access to a module's state entries by state-dict name, without the walk over the
    whole module that ``state_dict()`` does (it dominates a pass on a long chain)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __getitem__(self, name: str) -> torch.Tensor:
        owner, _, attr = name.rpartition(".")
        submodule = self.module._modules.get(owner)  # a node's own entry (most): no path walk
        if submodule is None:
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

def map_units(tensor: torch.Tensor, axis: int, block: int, matrix: torch.Tensor | None,
              selection: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``matrix`` (new units x old units) applied to the units of ``tensor`` along ``axis``
    (``selection``: ``selection_of(matrix)`` where the caller has it already; then ``matrix``
    may be None)."""
    shape = tuple(tensor.shape)
    units = shape[axis] // block
    split = tensor.reshape(*shape[:axis], units, block, *shape[axis + 1:])
    # the map is planned on the CPU; it is inspected there and applied where the tensor lives
    selection = selection_of(matrix) if selection is None else selection
    if selection is not None:
        # selections and scaled copies (widen, keep): gather, so that copies are exact and cheap
        index, scale = selection
        mapped = split.index_select(axis, index.to(tensor.device))
        mapped.mul_(scale.reshape(-1, *[1] * (split.dim() - axis - 1)).to(tensor))
        new = len(index)
    else:
        mapped = (split.movedim(axis, -1) @ matrix.to(tensor).T).movedim(-1, axis)
        new = matrix.shape[0]
    return mapped.reshape(*shape[:axis], new * block, *shape[axis + 1:])


def selection_of(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(index, scale)`` with row i of ``matrix`` = scale[i] times unit row ``index[i]``, where
    every row has at most one non-zero entry (a selection or scaled copy); else None."""
    rows, columns = matrix.nonzero(as_tuple=True)  # row-major: a repeated row follows itself
    if rows.numel() > 1 and bool((rows[1:] == rows[:-1]).any()):
        return None
    index = torch.zeros(matrix.shape[0], dtype=torch.long)
    scale = torch.zeros(matrix.shape[0], dtype=matrix.dtype)
    index[rows], scale[rows] = columns, matrix[rows, columns]
    return index, scale


def selection_matrix(index: torch.Tensor, scale: torch.Tensor, units: int) -> torch.Tensor:
    """The matrix (len(index) x ``units``) whose row i is scale[i] times unit row index[i]."""
    matrix = torch.zeros(len(index), units, dtype=scale.dtype)
    matrix[torch.arange(len(index)), index] = scale
    return matrix


TensorFn = Callable[[torch.Tensor], torch.Tensor]


def embed_units(matrix: torch.Tensor, total: int, before: tuple[int, ...]) -> torch.Tensor:
    """The map on all ``total`` units of an axis that applies ``matrix`` (new x old group
    units) to each copy of the group's units (``before[k]`` other units precede copy k) and
    keeps the other units; new units follow their copy."""
    new, old = matrix.shape
    if before == (0,) and total == old:
        return matrix
    full = torch.zeros(total + (new - old) * len(before), total, dtype=matrix.dtype)
    row = column = 0
    for k, others in enumerate((*before, total - old * len(before))):
        offset = others + k * old
        keep = offset - column
        full[row:row + keep, column:offset] = torch.eye(keep, dtype=matrix.dtype)
        row, column = row + keep, offset
        if k < len(before):
            full[row:row + new, column:column + old] = matrix
            row, column = row + new, column + old
    return full


@dataclass(frozen=True)
class UnitMap:
    """One linear map on the group's units of one axis (each copy, see ``UnitAxis.before``),
    plus the values of the new units (``fill(shape)`` of the part they occupy; optimizer state
    gets no fill). ``given``: the matrix (new units x old units); or ``(index, scale, old units)``
    of a selection (``selection_matrix``); or ``(old units, appended units)`` of the map that
    keeps every unit and appends zero units. The matrix is made only where needed."""
    axis: int
    block: int
    given: torch.Tensor | tuple[torch.Tensor, torch.Tensor, int] | tuple[int, int]
    fill: Callable[[tuple], torch.Tensor] | None = None
    before: tuple[int, ...] = (0,)

    @classmethod
    def selecting(cls, axis: int, block: int, index: torch.Tensor, scale: torch.Tensor, units: int,
                  fill=None, before: tuple[int, ...] = (0,)) -> "UnitMap":
        """The map whose new unit i is scale[i] times old unit index[i] of ``units``."""
        return cls(axis, block, (index, scale, units), fill, before)

    @classmethod
    def appending(cls, axis: int, block: int, units: int, new: int, fill=None,
                  before: tuple[int, ...] = (0,)) -> "UnitMap":
        """The map that keeps the ``units`` units and appends ``new`` zero units (widening with
        zero outgoing weights): applied by concatenation, several times cheaper than a gather."""
        return cls(axis, block, (units, new), fill, before)

    @property
    def _appends(self) -> bool:
        return isinstance(self.given, tuple) and len(self.given) == 2

    @functools.cached_property
    def matrix(self) -> torch.Tensor:
        return selection_matrix(*self.selection, self.shape[1]) if isinstance(self.given, tuple) else self.given

    @property
    def shape(self) -> tuple[int, int]:
        if self._appends:
            units, new = self.given
            return units + new, units
        return (len(self.given[0]), self.given[2]) if isinstance(self.given, tuple) else tuple(self.given.shape)

    @functools.cached_property
    def selection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``selection_of(matrix)``, worked out once per map (value and optimizer state)."""
        if self._appends:
            units, new = self.given
            return (torch.cat([torch.arange(units), torch.zeros(new, dtype=torch.long)]),
                    torch.cat([torch.ones(units, dtype=torch.float64), torch.zeros(new, dtype=torch.float64)]))
        return self.given[:2] if isinstance(self.given, tuple) else selection_of(self.given)

    def state(self, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.shape[self.axis] // self.block
        if self.before == (0,) and total == self.shape[1]:  # the map covers the whole axis
            if self._appends:  # new units follow the old ones on the axis
                appended = list(tensor.shape)
                appended[self.axis] = self.given[1] * self.block
                return torch.cat([tensor, tensor.new_zeros(appended)], self.axis)
            selection = self.selection
            return map_units(tensor, self.axis, self.block, self.matrix if selection is None else None, selection)
        return map_units(tensor, self.axis, self.block, embed_units(self.matrix, total, self.before))

    def value(self, tensor: torch.Tensor) -> torch.Tensor:
        mapped = self.state(tensor)
        if self.fill is not None:
            new, old = self.shape
            for k, others in enumerate(self.before):
                start = (others + k * new + old) * self.block
                part = mapped.narrow(self.axis, start, (new - old) * self.block)
                part.copy_(self.fill(tuple(part.shape)))  # drawn on the CPU from a seed: same values on any device
        return mapped


def composed(maps: list[UnitMap], part: str) -> TensorFn:
    """The tensor function applying ``maps`` in order (``part``: 'value' or 'state')."""
    def apply(tensor: torch.Tensor) -> torch.Tensor:
        for unit_map in maps:
            tensor = getattr(unit_map, part)(tensor)
        return tensor
    return apply


def unit_entries(tensor: torch.Tensor, axis: UnitAxis, units: int) -> torch.Tensor:
    """The entries of ``tensor`` on ``axis`` that belong to each of the group's ``units`` units,
    one row per unit (every copy, every entry of its block and of the other axes)."""
    moved = tensor.movedim(axis.axis, 0)
    split = moved.reshape(moved.shape[0] // axis.block, -1)
    index = torch.cat([torch.arange(units) + others + k * units for k, others in enumerate(axis.before)])
    return split[index.to(tensor.device)].reshape(len(axis.before), units, -1).transpose(0, 1).reshape(units, -1)


def keep_units(axis: UnitAxis, units: int, keep: list[int]) -> UnitMap:
    """The map on ``axis`` keeping units ``keep`` (in that order) of ``units``."""
    index = torch.tensor(keep, dtype=torch.long)
    return UnitMap.selecting(axis.axis, axis.block, index, torch.ones(len(keep), dtype=torch.float64), units,
                             before=axis.before)
