"""Import an existing nn.Module (built from supported ops) into a graphgrow Network.

The module is traced with torch.fx; each traced call is matched to the op that declares it
(``OpDef.imports_modules`` / ``imports_functions``), so import knowledge lives with the ops.
Residual patterns ``x + [h *] W2 act(W1 x + b)`` are folded into ``residual`` nodes, so that
passes which work on residual streams (insertion, depth hierarchies) apply to imported models.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .network import Network
from .tracing import (PROBE_BATCH, TracedShape, Tracer, claimants, evaluated, is_tensor_value, module_path,
                      observe, random_input, tensor_args)
from ..errors import GraphgrowError
from ..ir import INPUT, LayerGraph, Node
from ..ops.base import OpDef, Shape, get_op, registered_ops, require
from ..ops.structural import sample_axis

#: tensor methods that return their input's values unchanged (for graphgrow's value semantics)
_ALIASES = ("contiguous",)
#: calls that return their input's pieces as a tuple: (dim argument position, default dim)
_SPLITS = {"chunk": 2, "split": 2, torch.chunk: 2, torch.split: 2}


class _Importer:
    """Builds a LayerGraph from a traced module, one traced node at a time; records every
    node it cannot import instead of stopping at the first."""

    def __init__(self, module: nn.Module, traced: fx.GraphModule, graph: LayerGraph, seen: dict):
        self.module, self.traced, self.graph, self.seen = module, traced, graph, seen
        self.state: dict[str, torch.Tensor] = {}
        self.renamed: dict[fx.Node, str] = {}
        self.pieces: dict[fx.Node, tuple[fx.Node, int]] = {}  # chunk/split result -> (source, axis)
        self.tuples: dict[fx.Node, tuple[str, int]] = {}  # tuple-valued op -> (node, index of its value)
        self.params: dict[tuple[str, tuple], str] = {}
        #: traced tensors the same for every sample (positions and what is computed from them
        #: alone): they have no batch dimension, their traced shape is the per-sample shape
        self.unbatched: set[fx.Node] = set()
        #: id of each module tensor the state takes -> the layers holding it (shared weights: several)
        self.holders: dict[int, list[str]] = {}
        self.failed: set[fx.Node] = set()
        self.problems: list[GraphgrowError] = []

    def shape(self, fx_node) -> Shape:
        """The per-sample shape of a traced tensor; the batch dimension must stay first."""
        shape = self.seen[fx_node]
        if fx_node in self.unbatched:
            return tuple(shape)
        if not shape or shape[0] != PROBE_BATCH:
            if fx_node.all_input_nodes and all(n.op == "get_attr" for n in fx_node.all_input_nodes):
                raise GraphgrowError(f"computes a tensor of shape {list(shape)} from constants only (the same for "
                                     "every sample, without a batch dimension)",
                                     hint="compute it from the input (positions: torch.arange(x.size(1))), or "
                                          "make the result a module attribute (nn.Parameter or buffer)")
            raise GraphgrowError(f"computes a tensor of shape {list(shape)} whose first dimension is not "
                                 "the batch", hint="graphgrow keeps the batch dimension first; permute it back")
        return tuple(shape[1:])

    def run(self) -> None:
        for fx_node in self.traced.graph.nodes:
            if fx_node.op in ("placeholder", "output"):
                self.boundary(fx_node)
                continue
            if not is_tensor_value(self.seen.get(fx_node)) or fx_node.op == "get_attr":
                continue  # shape arithmetic and constants: their values go into the calls that use them
            inputs = [n for n in fx_node.all_input_nodes if is_tensor_value(self.seen.get(n))]
            if any(n in self.failed for n in inputs):
                # its inputs are missing, so only whether any op claims the call can be checked
                self.failed.add(fx_node)
                if not self.special(fx_node) and not claimants(fx_node, self.submodule(fx_node)):
                    self.problems.append(self.located(fx_node, GraphgrowError("is not supported")))
                continue
            if _is_arange(fx_node) or inputs and all(n in self.unbatched for n in inputs):
                self.unbatched.add(fx_node)
            try:
                self.visit(fx_node)
            except GraphgrowError as err:
                self.failed.add(fx_node)
                self.problems.append(self.located(fx_node, err))

    def located(self, fx_node: fx.Node, err: GraphgrowError) -> GraphgrowError:
        file, line = fx_node.meta.get("user_frame", (None, None))
        path = module_path(fx_node)
        if fx_node.op == "call_module":
            what = f"module '{path}' ({type(self.module.get_submodule(path)).__name__})"
            kind = "imports_modules"
        else:
            name = fx_node.target if isinstance(fx_node.target, str) else getattr(fx_node.target, "__name__", fx_node.target)
            what = (f"method .{name}()" if fx_node.op == "call_method" else f"call of {name}") + \
                (f" in module '{path}'" if path else "")
            kind = "imports_methods" if fx_node.op == "call_method" else "imports_functions"
        hint = err.hint or (f"register an op that declares it in {kind} (graphgrow.register_op); supported ops: "
                            + ", ".join(sorted(registered_ops())))
        return GraphgrowError(f"cannot import {what}: {err.message}", file=file, line=line,
                              node=path or type(self.module).__name__, hint=hint)

    def boundary(self, fx_node: fx.Node) -> None:
        if fx_node.op == "placeholder":
            if self.renamed:
                raise GraphgrowError("the module takes more than one input", file=self.graph.source,
                                     node=fx_node.name, hint="graphgrow networks have a single input")
            self.renamed[fx_node] = INPUT
            return
        results = fx_node.args[0]
        results = list(results) if isinstance(results, (tuple, list)) else [results]
        if not all(isinstance(r, fx.Node) and is_tensor_value(self.seen.get(r)) for r in results):
            raise GraphgrowError("the module returns something other than tensors", file=self.graph.source)
        if not any(r in self.failed for r in results):
            self.graph.outputs = [self.value(r) for r in results]

    def value(self, fx_node: fx.Node, rank: int | None = None) -> str:
        """The graph node holding a traced tensor; a module's tensor attribute becomes a
        ``parameter`` node of per-sample rank ``rank`` (that of the call that uses it)."""
        if fx_node in self.renamed:
            return self.renamed[fx_node]
        if fx_node.op != "get_attr":
            raise GraphgrowError(f"uses '{fx_node.name}', which is not a single tensor")
        tensor = operator.attrgetter(fx_node.target)(self.traced)
        shape = tuple(tensor.shape)
        rank = len(shape) if rank is None else rank
        if len(shape) == rank + 1 and shape[0] == 1:
            shape = shape[1:]
        elif len(shape) <= rank:
            shape = (1,) * (rank - len(shape)) + shape
        else:
            raise GraphgrowError(f"uses the tensor '{fx_node.target}' of shape {list(tensor.shape)} on inputs of "
                                 f"rank {rank}", hint="a free parameter has the per-sample shape or a leading 1")
        key = (str(fx_node.target), shape)
        if key not in self.params:
            op = get_op("parameter")
            name = self.graph.unique_name(str(fx_node.target).replace(".", "_"))
            self.graph.add(Node(name, op.name, op.check_args({"shape": list(shape)}), [],
                                frozen=not (isinstance(tensor, nn.Parameter) and tensor.requires_grad)))
            self.graph.node(name).out_shape = shape
            self.state[f"{name}.weight"] = tensor.detach().reshape(shape).clone()
            self.params[key] = name
            self.held(tensor, name)
        return self.params[key]

    def held(self, tensor: torch.Tensor, layer: str) -> None:
        holders = self.holders.setdefault(id(tensor), [])
        if layer not in holders:
            holders.append(layer)

    def submodule(self, fx_node: fx.Node) -> nn.Module | None:
        return self.module.get_submodule(fx_node.target) if fx_node.op == "call_module" else None

    def special(self, fx_node: fx.Node) -> bool:
        """Calls the importer handles itself: pieces of tuples, no-op methods, chunk/split,
        a free parameter's expand to the batch, and positions (torch.arange)."""
        return (fx_node.target is operator.getitem and fx_node.args[0] in self.pieces | self.tuples
                or _is_arange(fx_node)
                or fx_node.op == "call_method" and fx_node.target in _ALIASES
                or fx_node.op != "call_module" and fx_node.target in _SPLITS
                or fx_node.op == "call_method" and fx_node.target == "expand" and fx_node.args[0].op == "get_attr")

    def visit(self, fx_node: fx.Node) -> None:
        args = evaluated(fx_node.args, self.seen)
        kwargs = dict(evaluated(fx_node.kwargs, self.seen))
        target = fx_node.target
        if target is operator.getitem and fx_node.args[0] in self.pieces | self.tuples:
            self.renamed[fx_node] = self.tuple_item(fx_node, args[1])
            return
        if fx_node.op == "call_method" and target in _ALIASES:
            self.renamed[fx_node] = self.value(fx_node.args[0])
            return
        if target in _SPLITS and fx_node.op != "call_module":
            source = fx_node.args[0]
            dim = kwargs.get("dim", args[_SPLITS[target]] if len(args) > _SPLITS[target] else 0)
            rank = len(self.shape(source))
            self.pieces[fx_node] = (source, sample_axis(dim, rank, str(getattr(target, "__name__", target))))
            return
        if _is_arange(fx_node):
            self.positions(fx_node, args, kwargs)
            return
        if fx_node.op == "call_method" and target == "expand" and fx_node.args[0].op == "get_attr":
            op = get_op("expand_batch")
            out = self.shape(fx_node)
            self.add(fx_node, op, {}, [self.value(fx_node.args[0], len(out)), INPUT])
            return
        module = self.submodule(fx_node)
        tensors, others = tensor_args(args)
        value = self.seen[fx_node]
        out_shape = self.shape(fx_node) if isinstance(value, TracedShape) else None
        candidates = claimants(fx_node, module)
        constants = {key: operator.attrgetter(n.target)(self.traced)
                     for key, n in [*enumerate(fx_node.args), *fx_node.kwargs.items()]
                     if isinstance(n, fx.Node) and n.op == "get_attr"}
        if not candidates:
            raise GraphgrowError("is not supported")
        refusals = []
        for op in candidates:
            try:
                plain = {k: v for k, v in kwargs.items() if not isinstance(v, fx.Node)}
                adopted = self.adopted(op, tensors, kwargs) if module is None and op.adopted_roles else {}
                inputs = op.inputs_from_call(tensors[:1] if adopted else tensors, kwargs)
                rank = len(out_shape) if out_shape is not None else None
                in_shapes = [self.shape(t) if t in self.renamed or t.op != "get_attr" else None for t in inputs]
                if module is not None:
                    op_args = op.args_from_module(module)
                elif adopted:
                    op_args = op.args_from_parameters(adopted, others, plain)
                else:
                    op_args = op.args_from_traced(others, plain, in_shapes, out_shape)
                op_args = op.check_args(op.args_from_constants(op_args, constants))
                names = [self.value(t, rank) for t in inputs]
                shapes = [self.graph.shape_of(n) if n in self.graph or n == INPUT else None for n in names]
                got = tuple(op.output_shape(op_args, shapes))
                expected = out_shape if out_shape is not None else self.shape_in_tuple(fx_node, op)
                require(got == expected, f"'{op.name}' gives shape {list(got)}, the module {list(expected)}")
            except GraphgrowError as err:
                refusals.append(f"{op.name}: {err.message}")
                continue
            self.add(fx_node, op, op_args, names)
            layer = self.renamed[fx_node]
            held = module.state_dict(keep_vars=True) if module is not None else {}
            self.state.update({f"{layer}.{k}": v.detach() for k, v in held.items()})
            self.state.update({f"{layer}.{role}": t.detach().clone() for role, t in adopted.items()})
            for tensor in [*held.values(), *adopted.values()]:
                self.held(tensor, layer)
            if out_shape is None:
                self.tuples[fx_node] = (self.renamed.pop(fx_node), op.tuple_output)
            return
        raise GraphgrowError("; ".join(refusals) if len(refusals) > 1 else refusals[0].split(": ", 1)[1])

    def positions(self, fx_node: fx.Node, args: tuple, kwargs: dict) -> None:
        """``torch.arange`` giving 0..T-1 for the input's T tokens: a ``positions`` node."""
        length = self.graph.input_shape[0] if self.graph.input_shape else None
        bounds = {k: kwargs[k] for k in ("start", "end", "step") if k in kwargs}
        try:
            ids = torch.arange(*args, **bounds)
        except (TypeError, RuntimeError) as err:
            raise GraphgrowError(f"torch.arange with arguments graphgrow cannot evaluate ({err})") from None
        dtype = kwargs.get("dtype") or ids.dtype  # float bounds give float positions
        hint = ("give the positions of the input's tokens, torch.arange(x.size(1)), to an embedding, or use a "
                "learned position table as a parameter (nn.Parameter of shape (1, T, D))")
        if dtype.is_floating_point or dtype.is_complex:
            raise GraphgrowError(f"positions of dtype {dtype}: graphgrow imports torch.arange as the integer "
                                 "positions of the input's tokens", hint=hint)
        if length is None or not torch.equal(ids, torch.arange(length)):
            raise GraphgrowError(f"gives {_ids_text(ids)}: graphgrow imports torch.arange only as the positions "
                                 f"0..T-1 of the input's T = {length} tokens", hint=hint)
        self.add(fx_node, get_op("positions"), {}, [INPUT])

    def adopted(self, op: OpDef, tensors: list[fx.Node], kwargs: dict) -> dict[str, torch.Tensor]:
        """The module tensors a functional call passes as the op's parameters, by role."""
        given = [*tensors[1:], *(kwargs[r] for r in op.adopted_roles if isinstance(kwargs.get(r), fx.Node))]
        require(all(t.op == "get_attr" for t in given), "parameters computed by the traced code")
        return {role: operator.attrgetter(t.target)(self.traced) for role, t in zip(op.adopted_roles, given)}

    def shape_in_tuple(self, fx_node: fx.Node, op: OpDef) -> Shape:
        require(op.tuple_output is not None, f"'{op.name}' gives one tensor, the module a tuple")
        shape = self.seen[fx_node][op.tuple_output]
        require(shape[0] == PROBE_BATCH, "a result whose first dimension is not the batch")
        return tuple(shape[1:])

    def tuple_item(self, fx_node: fx.Node, index) -> str:
        source = fx_node.args[0]
        if source in self.tuples:
            name, wanted = self.tuples[source]
            require(index == wanted, f"uses result {index} of '{source.name}'; graphgrow keeps result {wanted}")
            return name
        tensor, axis = self.pieces[source]
        lengths = [piece[axis + 1] for piece in self.seen[source]]
        op = get_op("narrow")
        args = op.check_args({"dim": axis + 1, "start": sum(lengths[:index]), "length": lengths[index]})
        name = self.graph.unique_name(fx_node.name.strip("_") or "piece")
        self.graph.add(Node(name, op.name, args, [self.value(tensor)]))
        self.graph.node(name).out_shape = self.shape(fx_node)
        return name

    def add(self, fx_node: fx.Node, op: OpDef, args: dict, inputs: list[str]) -> None:
        name = _node_name(self.graph, fx_node.name, op)
        self.graph.add(Node(name, op.name, args, inputs))
        value = self.seen[fx_node]
        self.graph.node(name).out_shape = self.shape(fx_node) if isinstance(value, TracedShape) else \
            self.shape_in_tuple(fx_node, op)
        self.renamed[fx_node] = name


def import_module(module: nn.Module, input_shape, *, name: str = "imported", check: bool = True,
                  tokens: int | None = None) -> Network:
    """Trace ``module`` and rebuild it as a Network with its weights.

    ``input_shape`` is the per-sample shape (no batch dimension); ``tokens`` (the vocabulary
    size) says that the input holds integer token ids below it (probes are then drawn as such,
    and the graph's input records it). Every traced call is matched
    to an op; calls that no op imports are all reported at once, in one GraphgrowError (its
    ``problems`` lists each, located at the module path and source line). With ``check`` the
    imported network is compared with the module on a probe batch (eval mode) before it is
    returned.
    """
    where = type(module).__name__
    try:
        traced = fx.GraphModule(module, Tracer().trace(module))
    except Exception as err:  # fx raises many types for untraceable code
        raise GraphgrowError(f"cannot trace module {where}: {err}", file=f"<module {where}>",
                             hint="only modules built from supported ops (Sequential, residual "
                                  "x + f(x), linear, conv2d, activations, ...) can be imported") from None
    traced.graph.eliminate_dead_code()
    graph = LayerGraph(name, tuple(input_shape), source=f"<module {where}>", input_tokens=tokens)
    importer = _Importer(module, traced, graph, observe(traced, module, input_shape, tokens))
    importer.run()
    if importer.problems:
        first = importer.problems[0]
        listed = "; ".join(f"{p.file or '?'}:{p.line or '?'}: {p.node}: {p.message}" for p in importer.problems)
        error = GraphgrowError(f"{len(importer.problems)} unsupported call(s) in {where}: {listed}",
                               file=first.file, line=first.line, node=first.node, hint=first.hint)
        error.problems = importer.problems
        raise error
    _refuse_shared_tensors(module, importer, where)
    state = importer.state
    graph.infer_shapes()
    _fold_residuals(graph, state)
    network = Network.build(graph, state, dtype=next((p.dtype for p in module.parameters()), None))
    if check:
        _check_same_function(module, network, where)
    return network


def _refuse_shared_tensors(module: nn.Module, importer: "_Importer", where: str) -> None:
    """One tensor in the state of two imported layers (tied weights, e.g. a language model's
    output layer sharing the token embedding, or a module called twice): every graphgrow layer
    has tensors of its own, so the imported network would compute the same function at first
    but train the copies apart; refused."""
    shared = next(((key, layers) for key, layers in importer.holders.items() if len(layers) > 1), None)
    if shared is None:
        return
    names = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), name)
    key, layers = shared
    name = names.get(key, "a tensor")
    listed = " and ".join(f"'{layer}'" for layer in layers)
    raise GraphgrowError(f"'{name}' is used by the layers {listed} (shared or tied weights); every graphgrow layer "
                         "has tensors of its own, so the imported network would train them as separate tensors",
                         file=f"<module {where}>", node=name,
                         hint="if separate tensors are what you want, give each layer its own before importing: "
                              "a tied output layer e.g. model.lm_head.weight = nn.Parameter(model.wte.weight.detach()"
                              ".clone()), a module called twice: two modules")


def _is_arange(fx_node: fx.Node) -> bool:
    return fx_node.op == "call_function" and fx_node.target is torch.arange


def _ids_text(ids: torch.Tensor) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:4])
    return f"[{shown}{', ...' if len(ids) > 4 else ''}] ({len(ids)} of them)"


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
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    probe = random_input(network.graph.input_shape, 3, dtype, network.graph.input_tokens)
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
