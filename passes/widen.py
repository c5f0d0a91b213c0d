"""widen: add units to a linear or conv2d layer without changing the function (thesis 4.19,
Net2WiderNet)."""
from __future__ import annotations

import torch

from graphgrow import GraphgrowError, LayerGraph, Network

from .record import Origin, Record, rebuild
from .units import StateView, UnitCoupling, UnitMap, composed, set_units, trace_units

METHODS = ("sensli", "split")


def plan_widen(graph: LayerGraph, coupling: UnitCoupling, by: int, method: str, *, scale: float,
               alpha: float, units: list[int] | None, generator: torch.Generator,
               maps: dict[str, list[UnitMap]], incoming: torch.Tensor | None = None) -> None:
    """Add to ``maps`` the unit maps that widen the coupled group ``coupling`` by ``by`` units,
    and set the width argument of its producing layers in ``graph``."""
    node = graph.node(coupling.layer)
    n = coupling.units
    fail = lambda message, hint=None: GraphgrowError(message, file=graph.source, node=node.name, hint=hint)
    if isinstance(by, bool) or not isinstance(by, int) or by < 1:
        raise fail(f"widen by {by!r}: expected a positive number of units")
    if method not in METHODS:
        raise fail(f"unknown widening method {method!r}", hint=f"one of {', '.join(METHODS)}")
    if incoming is not None:
        fan_in = graph.node(coupling.layer).param_shapes().get("weight", (0,))[1:]
        if method != "sensli" or node.opdef.width_arg is None or tuple(incoming.shape) != (by, *fan_in):
            raise fail(f"incoming weights of shape {list(incoming.shape)}: expected {[by, *fan_in]} "
                       f"for method sensli on a linear or conv2d layer")
        if not bool(torch.isfinite(incoming).all()):
            raise fail("incoming weights contain NaN or infinity")
    if method == "sensli":
        if not scale > 0.0:
            raise fail(f"sensli scale {scale}: expected a positive standard deviation",
                       hint="incoming weights of new units must be non-zero (4.19)")
    else:
        if units is None:
            if by > n:
                raise fail(f"split duplicates distinct units: cannot split {by} of {n} units",
                           hint=f"by <= {n}, or method=sensli")
            units = torch.randperm(n, generator=generator)[:by].tolist()
        units = list(units)
        if len(units) != by or len(set(units)) != by or not all(isinstance(u, int) and 0 <= u < n for u in units):
            raise fail(f"split units {units}: expected {by} distinct unit indices in [0, {n})")
        if not 0.0 < alpha < 1.0 or alpha == 0.5:
            raise fail(f"split alpha {alpha}: expected 0 < alpha < 1, alpha != 0.5",
                       hint="alpha = 0.5 keeps the duplicates symmetric")
        index = torch.cat([torch.arange(n), torch.tensor(units, dtype=torch.long)])
        grown_scale = torch.ones(n + by, dtype=torch.float64)
        column_scale = grown_scale.clone()
        column_scale[units], column_scale[n:] = alpha, 1.0 - alpha
    for axis in coupling.axes:
        fill = None
        if axis.side != "columns":
            if method == "sensli" and axis.side == "state":
                fill = lambda shape, v=axis.fresh: torch.full(shape, v, dtype=torch.float64)
            elif incoming is not None and axis.tensor == f"{coupling.layer}.weight":
                fill = lambda shape, rows=incoming.detach().to(torch.float64): rows.reshape(shape)
            elif method == "sensli" and _is_weight(graph, axis.tensor):
                # a seed per tensor drawn now keeps the record's value function pure
                draw_seed = int(torch.randint(2 ** 62, (1,), generator=generator))
                fill = lambda shape, s=draw_seed: torch.randn(
                    shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64).mul_(scale)
        if method == "sensli":  # new units after the old ones: rows filled in, columns 0
            unit_map = UnitMap.appending(axis.axis, axis.block, n, by, fill, axis.before)
        else:
            unit_scale = column_scale if axis.side == "columns" else grown_scale
            unit_map = UnitMap.selecting(axis.axis, axis.block, index, unit_scale, n, fill, axis.before)
        maps.setdefault(axis.tensor, []).append(unit_map)
    set_units(graph, coupling, n + by)


def _is_weight(graph: LayerGraph, tensor: str) -> bool:
    node, role = tensor.split(".", 1)
    return len(graph.node(node).param_shapes().get(role, ())) >= 2


def apply_maps(network: Network, maps: dict[str, list[UnitMap]], record: Record) -> dict[str, torch.Tensor]:
    """New values of the mapped state entries; their origins go into ``record``."""
    state = StateView(network.module)
    values = {}
    for name, unit_maps in maps.items():
        value, derive = composed(unit_maps, "value"), composed(unit_maps, "state")
        values[name] = value(state[name].detach())
        record.origins[name] = Origin.derived([name], value, derive)
    return values


def widen(network: Network, layer: str, by: int, method: str = "sensli", scale: float = 0.1,
          alpha: float = 0.7, units: list[int] | None = None, seed: int = 0,
          incoming: torch.Tensor | None = None) -> tuple[Network, Record]:
    """Add ``by`` units to ``layer``; ``sensli``: incoming weights N(0, scale^2) (or the given
    ``incoming`` rows of ``layer``'s weight, shape (by, *fan-in), e.g. data-driven ones), bias 0,
    outgoing 0 (4.19); ``split``: duplicate ``units`` with outgoing weights alpha / 1 - alpha."""
    graph = network.graph.copy()
    coupling = trace_units(graph, layer, StateView(network.module))
    maps: dict[str, list[UnitMap]] = {}
    plan_widen(graph, coupling, by, method, scale=scale, alpha=alpha, units=units,
               generator=torch.Generator().manual_seed(seed), maps=maps, incoming=incoming)
    record = Record("widen")
    what = "heads" if network.graph.node(layer).opdef.head_arg else "units"
    record.notes.append(f"widened {', '.join(coupling.producers)} by {by} {what} ({method}); "
                        f"consumers: {', '.join(coupling.consumers)}")
    return rebuild(network, graph, record, apply_maps(network, maps, record)), record
