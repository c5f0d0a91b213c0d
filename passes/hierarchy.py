"""Depth and width hierarchies for multilevel training (thesis 3.4, Examples 3.34-3.36, and
width hierarchies): coarse networks plus restriction R_p = R_g and prolongation P as linear maps
on {parameter name: tensor} dicts."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphgrow import GraphgrowError, LayerGraph, Network

from .blocks import Block, find_blocks, last_layer
from .extend import widenable
from .units import UnitAxis, UnitMap, set_units, trace_units

INTERPOLATIONS = ("constant", "linear", "identity")  # identity: residual blocks only
RESTRICTIONS = ("half-transpose", "injection")
SCALINGS = ("average", "orthonormal")


# -- linear maps on parameter dicts ------------------------------------------------------------

@dataclass
class StackMap:
    """Fine tensors ``fine[i]`` and coarse tensors ``coarse[j]`` (same shapes) related by
    fine_i = sum_j P[i, j] coarse_j and coarse_j = sum_i R[j, i] fine_i."""
    fine: list[str]
    coarse: list[str]
    P: torch.Tensor
    R: torch.Tensor

    def apply(self, params: dict, direction: str) -> dict:
        src, dst, matrix = ((self.fine, self.coarse, self.R) if direction == "restrict"
                            else (self.coarse, self.fine, self.P))
        if src[0] not in params:
            return params
        stacked = torch.stack([params[name] for name in src])
        mixed = torch.tensordot(matrix.to(stacked), stacked, dims=1)
        out = {k: v for k, v in params.items() if k not in set(src)}
        out.update({name: mixed[k] for k, name in enumerate(dst)})
        return out


@dataclass
class AxisMap:
    """The units of one layer: each tensor in ``axes`` (name -> (axis, block, side)) is
    multiplied along its unit axis by R (coarse units x fine units) or P (fine x coarse) where
    the units are outputs (rows, per-unit state), and by the transposes P^T resp. R^T where
    they are a consumer's inputs (columns)."""
    axes: list[UnitAxis]
    P: torch.Tensor
    R: torch.Tensor

    def apply(self, params: dict, direction: str) -> dict:
        restrict = direction == "restrict"
        matrices = {"outputs": self.R if restrict else self.P,
                    "columns": self.P.T if restrict else self.R.T}
        out = dict(params)
        for axis in self.axes:
            if axis.tensor in out:
                matrix = matrices["columns" if axis.side == "columns" else "outputs"]
                out[axis.tensor] = UnitMap(axis.axis, axis.block, matrix, before=axis.before).state(out[axis.tensor])
        return out


class Transfer:
    """Fine and coarse network of one level pair and the maps between their parameter dicts
    (the ``graphgrow.mgopt.Transfer`` protocol). Names outside the maps pass unchanged."""

    def __init__(self, fine: Network, coarse_graph: LayerGraph, maps: list, kind: str):
        self.fine, self.maps, self.kind = fine, maps, kind
        state = self.restrict(dict(fine.module.state_dict()))
        self.coarse = Network.build(coarse_graph, state, dtype=fine.dtype, device=fine.device)
        self.coarse.module.train(fine.module.training)

    def restrict(self, fine: dict) -> dict:
        """R_p: fine parameter dict -> coarse parameter dict."""
        for linear_map in self.maps:
            fine = linear_map.apply(fine, "restrict")
        return fine

    def restrict_gradient(self, fine: dict) -> dict:
        """R_g (= R_p, thesis Examples 3.35-3.36)."""
        return self.restrict(fine)

    def prolong(self, coarse: dict) -> dict:
        """P: coarse parameter dict -> fine parameter dict."""
        for linear_map in reversed(self.maps):
            coarse = linear_map.apply(coarse, "prolong")
        return coarse

    # names the lead's design notes used
    restrict_params = restrict
    restrict_grads = restrict_gradient


# -- depth ---------------------------------------------------------------------------------------

def residual_stages(graph: LayerGraph) -> list[list[str]]:
    """Maximal chains of residual nodes with equal arguments and width, each read only by the next."""
    stages: list[list[str]] = []
    for node in graph.nodes:
        if node.op != "residual":
            continue
        previous = stages[-1][-1] if stages else None
        if (previous is not None and node.inputs[0] == previous and graph.consumers(previous) == [node.name]
                and previous not in graph.outputs and graph.node(previous).args == node.args):
            stages[-1].append(node.name)
        else:
            stages.append([node.name])
    return stages


def depth_prolongation(coarse_blocks: int, interpolation: str) -> torch.Tensor:
    """P (2N x N) of Example 3.35 (constant) or 3.36 (linear; the last fine block copies the
    last coarse block)."""
    P = torch.zeros(2 * coarse_blocks, coarse_blocks, dtype=torch.float64)
    for j in range(coarse_blocks):
        P[2 * j, j] = 1.0
        if interpolation == "constant" or j == coarse_blocks - 1:
            P[2 * j + 1, j] = 1.0
        else:
            P[2 * j + 1, j] = P[2 * j + 1, j + 1] = 0.5
    return P


def injection(coarse_blocks: int) -> torch.Tensor:
    """R (N x 2N) taking fine block 2j to coarse block j; R P = I for both interpolations."""
    R = torch.zeros(coarse_blocks, 2 * coarse_blocks, dtype=torch.float64)
    R[torch.arange(coarse_blocks), 2 * torch.arange(coarse_blocks)] = 1.0
    return R


def _check_depth_options(interpolation: str, restriction: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise GraphgrowError(f"unknown interpolation {interpolation!r}", hint=f"use {' or '.join(INTERPOLATIONS)}")
    if restriction not in RESTRICTIONS:
        raise GraphgrowError(f"unknown restriction {restriction!r}", hint=f"use {' or '.join(RESTRICTIONS)}")


def coarsen_depth(network: Network, interpolation: str = "constant",
                  restriction: str = "half-transpose") -> Transfer:
    """Halve every residual stage (even block count) and double h (thesis Example 3.34); on a
    network without residual nodes, the stages of residual blocks (``coarsen_block_depth``)."""
    graph = network.graph
    _check_depth_options(interpolation, restriction)
    stages = residual_stages(graph)
    if not stages and block_stages(graph):  # residual blocks as subgraphs (imported ResNets)
        return coarsen_block_depth(network, interpolation, restriction)
    if not stages:
        raise GraphgrowError(f"network '{graph.name}' has no residual blocks to coarsen", file=graph.source,
                             hint="depth hierarchies need ResNet stages (chains of residual nodes)")
    if interpolation == "identity":
        raise GraphgrowError(f"identity interpolation needs residual blocks as subgraphs; '{stages[0][0]}' is a "
                             "residual node, whose coarse block doubles h, so no fine pair computes it exactly",
                             file=graph.source, node=stages[0][0], hint="use constant or linear interpolation")
    coarse = graph.copy()
    maps = []
    for stage in stages:
        if len(stage) % 2:
            raise GraphgrowError(f"the residual stage starting at '{stage[0]}' has {len(stage)} blocks; "
                                 "halving needs an even number", file=graph.source, node=stage[0],
                                 hint="use an even number of blocks per stage (or fewer levels)")
        kept, dropped = stage[0::2], stage[1::2]
        for k, name in enumerate(kept):
            node = coarse.node(name)
            node.args = {**node.args, "h": 2.0 * node.args["h"]}
            if k > 0:
                coarse.set_inputs(name, [kept[k - 1]])
        for reader in coarse.consumers(stage[-1]):
            coarse.set_inputs(reader, [kept[-1] if i == stage[-1] else i for i in coarse.node(reader).inputs])
        coarse.outputs = [kept[-1] if o == stage[-1] else o for o in coarse.outputs]
        for name in reversed(dropped):
            coarse.remove(name)
        P = depth_prolongation(len(kept), interpolation)
        R = 0.5 * P.T if restriction == "half-transpose" else injection(len(kept))
        for role in graph.node(stage[0]).param_shapes():
            maps.append(StackMap([f"{b}.{role}" for b in stage], [f"{b}.{role}" for b in kept], P, R))
    coarse.infer_shapes()
    return Transfer(network, coarse, maps, "depth")


def _signature(graph: LayerGraph, block: Block) -> list:
    """Ops, arguments, input shapes and internal wiring of a block's nodes, in order; without
    the arguments that act in train mode only (``OpDef.train_only_args``: a coarse block keeps
    its own drop rate, the fine blocks theirs)."""
    index = {name: k for k, name in enumerate(block.nodes)}
    nodes = [graph.node(n) for n in block.nodes]
    return [(node.op, {k: v for k, v in node.args.items() if k not in node.opdef.train_only_args}, node.in_shapes,
             [index.get(i, "entry") for i in node.inputs]) for node in nodes]


def block_stages(graph: LayerGraph) -> list[list[tuple[Block, ...]]]:
    """Stages of residual blocks (passes.blocks) with identity shortcuts, each block reading the
    previous one's output alone, as lists of equal groups of consecutive blocks: a ResNet stage
    is a run of equal blocks (groups of one), a transformer's encoder blocks are groups of two
    (an attention and an MLP sub-block). A chain that repeats one group throughout is one
    stage, with the shortest such group; otherwise every run of equal blocks is one."""
    chains: list[list[Block]] = []
    for block in find_blocks(graph):
        previous = chains[-1][-1] if chains and chains[-1] else None
        if block.shortcut:
            chains.append([])
        elif (previous is not None and block.entry == previous.output and previous.output not in graph.outputs
              and set(graph.consumers(previous.output)) <= set(block.nodes)):
            chains[-1].append(block)
        else:
            chains.append([block])
    return [stage for chain in chains if chain for stage in _periodic_stages(graph, chain)]


def _periodic_stages(graph: LayerGraph, chain: list[Block]) -> list[list[tuple[Block, ...]]]:
    signatures = [_signature(graph, block) for block in chain]
    for period in range(1, len(chain) // 2 + 1):
        if len(chain) % period == 0 and all(sig == signatures[k % period] for k, sig in enumerate(signatures)):
            return [[tuple(chain[k:k + period]) for k in range(0, len(chain), period)]]
    stages: list[list[tuple[Block, ...]]] = []
    for k, block in enumerate(chain):
        if k and signatures[k] == signatures[k - 1]:
            stages[-1].append((block,))
        else:
            stages.append([(block,)])
    return stages


def _group_nodes(group: tuple[Block, ...]) -> list[str]:
    return [name for block in group for name in block.nodes]


def coarsen_block_depth(network: Network, interpolation: str = "constant",
                        restriction: str = "half-transpose") -> Transfer:
    """Halve every stage of two or more equal groups of blocks (even count): the depth hierarchy
    of Example 3.34 on residual blocks whose branch is any subgraph (ResNet blocks, transformer
    encoder blocks). The coarse block's branch is doubled (h -> 2h) by doubling the roles that
    zero its last layer (``zero_output_roles``): their restriction is 2R and prolongation P/2,
    so R P = I still. ``identity`` interpolation prolongs exactly instead: fine group 2j is
    coarse group j, fine group 2j+1 a copy with its last layers zero (the identity), so the
    prolonged network computes the coarse network's function; its last layers restrict by the
    sum (half-transpose) or by injection. Buffers (batch-norm statistics) are restricted by
    injection and prolonged by copies."""
    graph = network.graph
    _check_depth_options(interpolation, restriction)
    stages = [stage for stage in block_stages(graph) if len(stage) > 1]
    if not stages:
        raise GraphgrowError(f"network '{graph.name}' has no stage of two or more equal residual blocks",
                             file=graph.source, hint="depth hierarchies need ResNet stages (chains of equal blocks)")
    state = network.module.state_dict()
    coarse = graph.copy()
    maps = []
    for stage in stages:
        first = stage[0]
        if len(stage) % 2:
            raise GraphgrowError(f"the block stage starting at '{first[-1].output}' has {len(stage)} blocks; "
                                 "halving needs an even number", file=graph.source, node=first[-1].output,
                                 hint="use an even number of blocks per stage (or fewer levels)")
        kept, dropped = stage[0::2], stage[1::2]
        for keep, drop in zip(kept, dropped):
            for reader in coarse.consumers(drop[-1].output):
                coarse.set_inputs(reader, [keep[-1].output if i == drop[-1].output else i
                                           for i in coarse.node(reader).inputs])
            coarse.outputs = [keep[-1].output if o == drop[-1].output else o for o in coarse.outputs]
            for name in reversed(_group_nodes(drop)):
                coarse.remove(name)
        copies, inject = depth_prolongation(len(kept), "constant"), injection(len(kept))
        half = 0.5 * copies.T if restriction == "half-transpose" else inject
        if interpolation == "identity":
            P, R = copies, half
            P_last, R_last = inject.T, (copies.T if restriction == "half-transpose" else inject)
        else:
            P = depth_prolongation(len(kept), interpolation)
            R = 0.5 * P.T if restriction == "half-transpose" else inject
            P_last, R_last = P / 2, 2 * R
        last = dict(filter(None, (last_layer(graph, block.branch[-1], set(block.nodes)) for block in first)))
        positions = _group_nodes(first)
        for position, name in enumerate(positions):
            params = graph.node(name).param_shapes()
            for key in [k[len(name) + 1:] for k in state if k.startswith(f"{name}.")]:
                fine = [f"{_group_nodes(g)[position]}.{key}" for g in stage]
                coarse_names = [f"{_group_nodes(g)[position]}.{key}" for g in kept]
                if key not in params:
                    maps.append(StackMap(fine, coarse_names, copies, inject))
                elif key in last.get(name, ()):
                    maps.append(StackMap(fine, coarse_names, P_last, R_last))
                else:
                    maps.append(StackMap(fine, coarse_names, P, R))
    coarse.infer_shapes()
    return Transfer(network, coarse, maps, "depth")


# -- width ---------------------------------------------------------------------------------------

def unit_matrices(units: int, groups: list[list[int]], scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """R (groups x units) with rows 1/g (average) or 1/sqrt(g) (orthonormal) on each group and
    P = g R^T resp. R^T, so that R P = I. They act on a layer's output units; its consumers'
    columns take R^T (prolongation) and P^T (restriction), which is the same R P = I transposed.
    With ``average`` the prolonged network computes the coarse network's function exactly: every
    fine unit of a group is a copy of its coarse unit and the consumer's columns split the coarse
    column 1/g each, so the copies add up to it again (Net2WiderNet); the restriction averages
    rows and sums columns, so it gives back the coarse network of a prolonged one exactly.
    ``orthonormal`` (R R^T = I) prolongs exactly only through positively homogeneous
    activations (relu, leaky_relu, identity) without normalisation: a copy is the coarse unit
    divided by sqrt(g)."""
    R = torch.zeros(len(groups), units, dtype=torch.float64)
    P = torch.zeros(units, len(groups), dtype=torch.float64)
    for j, group in enumerate(groups):
        g = len(group)
        R[j, group] = 1.0 / g if scaling == "average" else g ** -0.5
        P[group, j] = 1.0 if scaling == "average" else g ** -0.5
    return P, R


def _check_groups(graph: LayerGraph, layer: str, units: int, groups) -> list[list[int]]:
    if groups is None:
        if units % 2:
            raise GraphgrowError(f"'{layer}' has {units} units; pairing needs an even number", file=graph.source,
                                 node=layer, hint="give groups explicitly")
        return [[2 * j, 2 * j + 1] for j in range(units // 2)]
    flat = sorted(u for group in groups for u in group)
    if flat != list(range(units)) or any(not group for group in groups):
        raise GraphgrowError(f"groups of '{layer}' must partition its units 0..{units - 1}, got {groups}",
                             file=graph.source, node=layer)
    return [list(group) for group in groups]


def strongest_pairs(strength: torch.Tensor) -> list[list[int]]:
    """Units paired greedily by a symmetric strength matrix (data-driven width coarsening):
    repeatedly the two unpaired units with the largest strength; with an odd count the last
    unit stays alone. Pass the result as ``groups`` to :func:`coarsen_width`."""
    units = strength.shape[0]
    scores = strength.detach().double().clone()
    scores.fill_diagonal_(-float("inf"))
    groups, free = [], set(range(units))
    for flat in torch.argsort(scores.reshape(-1), descending=True).tolist():
        i, j = divmod(flat, units)
        if i < j and i in free and j in free:
            groups.append([i, j])
            free -= {i, j}
        if len(free) < 2:
            break
    return sorted(groups + [[u] for u in sorted(free)])


def coarsen_width(network: Network, layers: list[str] | None = None, groups: list[list[int]] | None = None,
                  scaling: str = "average") -> Transfer:
    """One unit per group for each of ``layers`` (default: every widenable layer with an even
    number of units; groups default to consecutive pairs)."""
    graph = network.graph
    if scaling not in SCALINGS:
        raise GraphgrowError(f"unknown scaling {scaling!r}", hint=f"use {' or '.join(SCALINGS)}")
    if layers is None:
        layers = [name for name in widenable(graph) if graph.node(name).out_shape[0] % 2 == 0]
        if not layers:
            raise GraphgrowError(f"network '{graph.name}' has no layer whose width can be halved",
                                 file=graph.source)
    if groups is not None and len(layers) != 1:
        raise GraphgrowError("explicit groups need exactly one layer", file=graph.source)
    coarse = graph.copy()
    maps, covered = [], {}
    for layer in layers:  # each group traced on the graph with the groups before it coarsened
        coupling = trace_units(coarse, layer, network.module.state_dict())
        if layer in covered:
            raise GraphgrowError(f"'{layer}' is tied to '{covered[layer]}' (one coupled group); "
                                 "name one layer per group", file=graph.source, node=layer)
        covered.update(dict.fromkeys(coupling.producers, layer))
        layer_groups = _check_groups(graph, layer, coupling.units, groups)
        P, R = unit_matrices(coupling.units, layer_groups, scaling)
        maps.append(AxisMap(coupling.axes, P, R))
        set_units(coarse, coupling, len(layer_groups))
        coarse.infer_shapes()
    return Transfer(network, coarse, maps, "width")


# -- hierarchies --------------------------------------------------------------------------------

@dataclass
class Level:
    """One level: its network and the transfer from the next finer level (None on level 0)."""
    network: Network
    transfer: Transfer | None


def build_hierarchy(network: Network, kind: str = "depth", levels: int = 2, **options) -> list[Level]:
    """Levels 0 (the given network) to ``levels - 1`` by repeated coarsening."""
    coarsen = {"depth": coarsen_depth, "width": coarsen_width}.get(kind)
    if coarsen is None:
        raise GraphgrowError(f"unknown hierarchy kind {kind!r}", hint="use depth or width")
    result = [Level(network, None)]
    for _ in range(levels - 1):
        transfer = coarsen(result[-1].network, **options)
        result.append(Level(transfer.coarse, transfer))
    return result
