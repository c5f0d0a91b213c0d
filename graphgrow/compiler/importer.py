"""Import an existing nn.Module (built from supported ops) into a graphgrow Network.

The module is traced with torch.fx; each traced call is matched to the op that declares it
(``OpDef.imports_modules`` / ``imports_functions``), so import knowledge lives with the ops.
Residual patterns ``x + [h *] W2 act(W1 x + b)`` are folded into ``residual`` nodes, so that
passes which work on residual streams (insertion, depth hierarchies) apply to imported models.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .network import Network
from ..errors import GraphgrowError
from ..ir import INPUT, LayerGraph, Node
from ..ops.base import OpDef, registered_ops
from ..ops.residual import Residual

_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "flatten": "flatten",
            "add": "add", "mul": "scale"}


class _Tracer(fx.Tracer):
    """Keeps graphgrow's own Residual module whole, like torch.nn's modules."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, Residual) or super().is_leaf_module(module, qualified_name)


def _op_for_module(module: nn.Module) -> OpDef | None:
    for op in registered_ops().values():
        if type(module) in op.imports_modules:
            return op
    return None


def _op_for_function(fn) -> OpDef | None:
    for op in registered_ops().values():
        if any(fn is candidate for candidate in op.imports_functions):
            return op
    return None


def _split_args(args) -> tuple[list[fx.Node], tuple]:
    """Tensor inputs (fx nodes, also inside a list as for torch.cat) and the other arguments."""
    tensors, others = [], []
    for arg in args:
        if isinstance(arg, fx.Node):
            tensors.append(arg)
        elif isinstance(arg, (list, tuple)) and arg and all(isinstance(a, fx.Node) for a in arg):
            tensors.extend(arg)
        else:
            others.append(arg)
    return tensors, tuple(others)


def import_module(module: nn.Module, input_shape, *, name: str = "imported",
                  check: bool = True) -> Network:
    """Trace ``module`` and rebuild it as a Network with its weights.

    ``input_shape`` is the per-sample shape (no batch dimension). With ``check`` the imported
    network is compared with the module on a probe batch (eval mode) before it is returned.
    """
    where = type(module).__name__
    try:
        traced = _Tracer().trace(module)
    except Exception as err:  # fx raises many types for untraceable code
        raise GraphgrowError(f"cannot trace module {where}: {err}", file=f"<module {where}>",
                             hint="only modules built from supported ops (Sequential, residual "
                                  "x + f(x), linear, conv2d, activations, ...) can be imported") from None
    graph = LayerGraph(name, tuple(input_shape), source=f"<module {where}>")
    state: dict[str, torch.Tensor] = {}
    renamed: dict[fx.Node, str] = {}
    for fx_node in traced.nodes:
        if fx_node.op == "placeholder":
            if renamed:
                raise GraphgrowError(f"module {where} takes more than one input", file=graph.source,
                                     node=fx_node.name,
                                     hint="graphgrow networks have a single input")
            renamed[fx_node] = INPUT
            continue
        if fx_node.op == "output":
            results = fx_node.args[0]
            results = list(results) if isinstance(results, (tuple, list)) else [results]
            if not all(isinstance(r, fx.Node) for r in results):
                raise GraphgrowError(f"module {where} returns something other than tensors",
                                     file=graph.source)
            graph.outputs = [renamed[r] for r in results]
            continue
        tensors, others = _split_args(fx_node.args)
        described = f"{fx_node.op} {fx_node.target}"
        try:
            if fx_node.op == "call_module":
                submodule = module.get_submodule(fx_node.target)
                described = f"module '{fx_node.target}' ({type(submodule).__name__})"
                op = _op_for_module(submodule)
                if op is None:
                    raise GraphgrowError("is not supported")
                args = op.args_from_module(submodule)
                module_state = submodule.state_dict()
            elif fx_node.op == "call_function":
                described = f"call of {getattr(fx_node.target, '__name__', fx_node.target)}"
                op = _op_for_function(fx_node.target)
                if op is None:
                    raise GraphgrowError("is not supported")
                args = op.args_from_call(others, dict(fx_node.kwargs))
            elif fx_node.op == "call_method" and fx_node.target in _METHODS:
                described = f"method .{fx_node.target}()"
                op = registered_ops()[_METHODS[fx_node.target]]
                args = op.args_from_call(others, dict(fx_node.kwargs))
            else:
                raise GraphgrowError("is not supported")
            args = op.check_args(args)
        except GraphgrowError as err:
            raise GraphgrowError(f"cannot import {described}: {err.message}",
                                 file=graph.source, node=fx_node.name,
                                 hint=err.hint or "supported: " + ", ".join(sorted(registered_ops()))) from None
        node_name = _node_name(graph, fx_node.name, op)
        graph.add(Node(node_name, op.name, args, [renamed[t] for t in tensors]))
        renamed[fx_node] = node_name
        if fx_node.op == "call_module":
            state.update({f"{node_name}.{k}": v for k, v in module_state.items()})
    graph.infer_shapes()
    _fold_residuals(graph, state)
    network = Network.build(graph, state)
    if check:
        _check_same_function(module, network, where)
    return network


def _node_name(graph: LayerGraph, traced_name: str, op: OpDef) -> str:
    """fx names Sequential children '_0', '_1'; prefix such names with the op."""
    base = traced_name.strip("_")
    if not base or base[0].isdigit():
        base = f"{op.name}{base}"
    return graph.unique_name(base)


def _single_reader(graph: LayerGraph, name: str) -> bool:
    return len(graph.consumers(name)) == 1 and name not in graph.outputs


def _residual_match(graph: LayerGraph, add: Node):
    """(stream, chain, args) if ``add`` is x + [h *] [W2] act(W1 x + b), else None."""
    if add.op != "add" or len(add.inputs) != 2:
        return None
    for stream, branch in (add.inputs, add.inputs[::-1]):
        chain, h, current = [], 1.0, branch
        node = graph.node(current) if current in graph else None
        if node is not None and node.op == "scale" and _single_reader(graph, current):
            h, chain = node.args["factor"], [node]
            node = graph.node(node.inputs[0]) if node.inputs[0] in graph else None
        outer = None
        if node is not None and node.op in ("linear", "conv2d") and not node.args["bias"]:
            outer, chain = node, chain + [node]
            node = graph.node(node.inputs[0]) if node.inputs[0] in graph else None
        if node is None or not node.opdef.elementwise or not node.opdef.imports_modules:
            continue
        act = node
        inner = graph.node(act.inputs[0]) if act.inputs[0] in graph else None
        if inner is None or inner.op not in ("linear", "conv2d") or inner.inputs != [stream]:
            continue
        if not all(_single_reader(graph, n.name) for n in [*chain, act, inner]):
            continue
        if inner.out_shape != inner.in_shapes[0] or (outer and outer.out_shape != outer.in_shapes[0]):
            continue
        conv = inner.op == "conv2d"
        if conv and not all(n.args["stride"] == 1 and n.args["kernel"] % 2 == 1 and
                            n.args["padding"] in ("same", n.args["kernel"] // 2) and
                            n.args["kernel"] == inner.args["kernel"] for n in filter(None, [inner, outer])):
            continue
        if outer is not None and outer.op != inner.op or act.op == "leaky_relu":
            continue
        args = {"branch": inner.op, "form": "two_weight" if outer else "one_weight",
                "activation": act.op, "h": h, "bias": inner.args["bias"],
                **({"kernel": inner.args["kernel"]} if conv else {})}
        return stream, [*chain, act, inner], inner, outer, args
    return None


def _fold_residuals(graph: LayerGraph, state: dict) -> None:
    for add in list(graph.nodes):
        match = _residual_match(graph, add)
        if match is None:
            continue
        stream, chain, inner, outer, args = match
        block = Node(graph.unique_name("residual"), "residual", args, [stream], loc=add.loc)
        graph.add(block, after=add.name)
        graph.redirect(add.name, block.name)
        for role, source in (("inner", inner), ("outer", outer)):
            for key in ("weight", "bias"):
                if source is not None and f"{source.name}.{key}" in state:
                    state[f"{block.name}.{role}.{key}"] = state.pop(f"{source.name}.{key}")
        graph.remove(add.name)
        for node in chain:  # from the add backwards, each now unread
            graph.remove(node.name)
    graph.infer_shapes()


def _check_same_function(module: nn.Module, network: Network, where: str) -> None:
    probe = torch.randn((3, *network.graph.input_shape), generator=torch.Generator().manual_seed(0))
    was_training = module.training
    module.eval()
    network.module.eval()
    try:
        with torch.no_grad():
            expected, got = module(probe), network.module(probe)
    finally:
        module.train(was_training)
        network.module.train(was_training)
    expected = expected if isinstance(expected, (tuple, list)) else [expected]
    got = got if isinstance(got, (tuple, list)) else [got]
    if any(not torch.allclose(e, g, rtol=1e-4, atol=1e-5) for e, g in zip(expected, got)):
        raise GraphgrowError(f"the imported network does not reproduce {where} on a probe batch",
                             file=network.graph.source,
                             hint="the module may use operations graphgrow does not model")
