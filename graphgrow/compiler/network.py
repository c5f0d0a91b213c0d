"""Compile a LayerGraph plus parameters to a torch.fx.GraphModule.

One ``call_module`` per parametric (or train/eval-aware) node, ``call_function`` for stateless
ops, fx node names equal to spec node names, and node metadata pointing at the spec line.
Parameters are named ``<node>.<role>``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx import graph_module as fx_graph_module
from torch.fx.experimental import _config as fx_config

from ..errors import GraphgrowError
from ..init import apply_init, normalize_init
from ..ir import LayerGraph
from ..ops.base import OpDef
from . import codegen

PLACEHOLDER = "x"


def build_modules(graph: LayerGraph, skip=(), stateless_as_modules: bool = False) -> dict[str, nn.Module]:
    """Fresh (uninitialised) modules of the nodes that compile to ``call_module``, except ``skip``;
    with ``stateless_as_modules`` also of the stateless ops that have a module twin."""
    return _fresh_modules(_module_nodes(graph.nodes, skip, stateless_as_modules), stateless_as_modules)


def _fresh_modules(todo: list, stateless_as_modules: bool) -> dict[str, nn.Module]:
    modules = {}
    if not todo:  # e.g. a pass that hands in every module
        return modules
    # torch modules draw a throwaway initialisation from the global generator in their
    # constructors; fork it so compiling leaves the user's random stream (data order, dropout) alone
    with torch.random.fork_rng(devices=[]):
        for node in todo:
            module = node.opdef.build_module(node.args, node.in_shapes)
            if module is None and stateless_as_modules:
                module = node.opdef.torch_module(node.args)
            if module is not None:
                modules[node.name] = module
    return modules


def _module_nodes(nodes: list, skip, stateless_as_modules: bool) -> list:
    """The nodes outside ``skip`` that may compile to a module (their op builds one)."""
    return [node for node in nodes if node.name not in skip
            and (stateless_as_modules or type(node.opdef).build_module is not OpDef.build_module)]


def initialize(graph: LayerGraph, modules: dict[str, nn.Module], seed: int) -> None:
    """Deterministic initialisation: one generator, nodes in topological order."""
    generator = torch.Generator().manual_seed(seed)
    for node in graph.nodes:
        module = modules.get(node.name)
        if module is None:
            continue
        node.opdef.default_init(module, node.args, generator)
        params = dict(module.named_parameters())
        apply_init(params, normalize_init(node.init, list(node.param_shapes())), generator)


def _load(graph: LayerGraph, root: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = root.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise GraphgrowError(f"weights do not fit network '{graph.name}': "
                             f"{len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})",
                             file=graph.source, node=first.split(".")[0],
                             hint="were the weights saved from this spec?")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise GraphgrowError(f"weight '{key}' has shape {list(tensor.shape)}, the network needs "
                                 f"{list(expected[key].shape)}", file=graph.source, node=key.split(".")[0])
    # per node: root.load_state_dict scans every key once per submodule (quadratic in depth)
    by_node: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        node, _, role = key.partition(".")
        by_node.setdefault(node, {})[role] = tensor
    for node, entries in by_node.items():
        root.get_submodule(node).load_state_dict(entries)


def _too_large(graph: LayerGraph, dtype, why: str) -> GraphgrowError:
    size = graph.num_params() * torch.empty((), dtype=dtype or torch.get_default_dtype()).element_size()
    return GraphgrowError(f"network '{graph.name}' is too large: {graph.num_params():,} parameters "
                          f"({size / 2**30:,.1f} GiB); {why}", file=graph.source,
                          hint="lower the layer widths or the input size")


@functools.cache
def _physical_memory() -> int | None:
    if not hasattr(os, "sysconf") or "SC_PHYS_PAGES" not in os.sysconf_names:
        return None
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits_in_memory(graph: LayerGraph, dtype: torch.dtype | None = None) -> None:
    """Refuse, before allocating anything, a network whose parameters alone exceed this
    machine's physical memory (the allocation would fail or, with overcommit, swap and be killed)."""
    memory = _physical_memory()
    if memory is None:
        return
    element = torch.empty((), dtype=dtype or torch.get_default_dtype()).element_size()
    if graph.num_params() * element > memory:
        raise _too_large(graph, dtype, f"this machine has {memory / 2**30:,.1f} GiB of memory")


def compile_graph(graph: LayerGraph, state: dict[str, torch.Tensor] | None = None, *,
                  seed: int = 0, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  modules: dict[str, nn.Module] | None = None,
                  stateless_as_modules: bool = False, code_from: fx.GraphModule | None = None) -> fx.GraphModule:
    """Compile ``graph`` to a GraphModule, with parameters from ``state`` or initialised
    deterministically from ``seed`` (same seed, bitwise-identical parameters).

    ``modules``: ready modules for some nodes, used as they are (passes hand in copies of
    unchanged layers); ``state`` then holds the entries of the other nodes only.
    ``stateless_as_modules``: activations, pooling and flatten become ``call_module`` too (same
    function and state dict), for tools that only understand modules, e.g. BackPACK's
    ``extend(..., use_converter=True)``. ``dtype`` and ``device``: where the parameters live
    (a fresh initialisation is drawn on the CPU, from the seed, and then moved).
    ``code_from``: a module compiled from a graph with the same nodes, inputs, ops and outputs
    (only arguments such as widths differ): its generated forward is reused, which skips fx's
    code generation, most of a compile (passes that change widths only)."""
    given = modules or {}
    nodes = graph.nodes
    todo = _module_nodes(nodes, given, stateless_as_modules)
    if todo:  # parameters to allocate, perhaps
        check_fits_in_memory(graph, dtype)
    try:
        fresh = _fresh_modules(todo, stateless_as_modules)
    except (MemoryError, RuntimeError) as err:  # torch reports a failed allocation as a RuntimeError
        if isinstance(err, RuntimeError) and "allocate" not in str(err):
            raise
        raise _too_large(graph, dtype, "memory ran out while allocating them") from None
    root = nn.Module()
    root._modules.update(fresh)
    if state is None:
        initialize(graph, fresh, seed)
    elif fresh:
        # before loading, so that float64 weights keep their precision and nothing passes the CPU
        root.to(device=device, dtype=dtype)
        _load(graph, root, state)
    elif state:
        _load(graph, root, state)  # entries left over: the error names them
    if given:
        root._modules = {node.name: given[node.name] if node.name in given else fresh[node.name]
                         for node in nodes if node.name in given or node.name in fresh}
    modules = dict(root.named_children())
    for node in nodes:
        if node.frozen and node.name in modules:
            modules[node.name].requires_grad_(False)

    if code_from is not None and list(code_from._modules) == list(root._modules):  # same call_module nodes
        module = _with_code_of(code_from, root)
        if state is None:  # a given state was loaded in dtype and on device already
            module.to(device=device, dtype=dtype)
        return module
    recording = codegen.Recording()  # the fx graph is made from it where one is needed
    values = {"input": recording.create_node("placeholder", PLACEHOLDER, (), {}, PLACEHOLDER)}
    for node in nodes:
        recording.origin = (node.name, node.op, node.loc)  # what the op emits points at its spec line
        values[node.name] = node.opdef.emit(recording, node.name, node.args,
                                            [values[i] for i in node.inputs], node.name in modules)
    recording.origin = None
    outputs = [values[name] for name in graph.outputs]
    recording.create_node("output", "output", (outputs[0] if len(outputs) == 1 else tuple(outputs),), {}, "output")
    module = _compiled(root, recording, graph.name)
    if state is None:  # a given state was loaded in dtype and on device already
        module.to(device=device, dtype=dtype)
    return module


class CompiledModule(fx.GraphModule):
    """The GraphModule ``compile_graph`` returns. Its fx graph is made on first use (``graph``,
    printing, copying, pickling) from a private source that never changes (the recording of its
    compile, or a graph), so that a compile makes no fx graph and modules compiled from each
    other with the same code (passes that change only widths) share the source instead of
    copying the graph node by node (most of such a rebuild otherwise).
    fx reads ``__dict__['_graph']`` directly in places (copying, pickling): the graph is kept
    there once made, and those places make it first."""

    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, "_graph"]  # torch.jit.script

    @property
    def _graph(self) -> fx.Graph:
        graph = self.__dict__.get("_graph")
        if graph is None:
            graph = self.__dict__["_graph"] = _graph_of(self.__dict__["_graph_source"], owning_module=self)
        return graph

    @_graph.setter
    def _graph(self, graph: fx.Graph) -> None:
        self.__dict__["_graph"] = graph

    def _private_source(self) -> codegen.Recording | fx.Graph:
        """A source of this module's code that nobody edits: the shared source while the module's
        own graph was never made (once handed out, it may have been edited), else a copy of it."""
        if "_graph" not in self.__dict__ and "_graph_source" in self.__dict__:
            return self.__dict__["_graph_source"]
        return _graph_of(self._graph)

    def _as_plain(self, method, *args):
        """Run a GraphModule method that reads ``__dict__['_graph']`` (copying, pickling) with the
        graph made and without the source (which is not to be copied or pickled)."""
        self._graph  # noqa: B018  (makes it)
        source = self.__dict__.pop("_graph_source", None)
        try:
            return method(self, *args)
        finally:
            if source is not None:
                self.__dict__["_graph_source"] = source

    def __deepcopy__(self, memo):
        return self._as_plain(fx.GraphModule.__deepcopy__, memo)

    def __reduce__(self):
        return self._as_plain(fx.GraphModule.__reduce__)

    def __reduce_package__(self, exporter):
        return self._as_plain(fx.GraphModule.__reduce_package__, exporter)


def _compiled(root: nn.Module, recording: codegen.Recording, class_name: str) -> CompiledModule:
    """``fx.GraphModule(root, recording.replay(), class_name)`` as a CompiledModule whose private
    source is ``recording``, made without an fx graph, without the graph module's constructor
    (whose class per module, submodules set one by one through ``nn.Module.__setattr__`` and
    recompile bookkeeping are a third of its time), and with the forward written by ``codegen``.
    Recordings that need more than a forward over submodules of ``root`` (fx's profiler setting,
    get_attr of a parameter, nested targets) take fx's way."""
    targets = [node.target for node in recording.nodes if node.op in ("call_module", "get_attr")]
    profiled = getattr(fx_config, "enrich_profiler_metadata", False)  # a setting of newer torch versions
    if profiled or not codegen.AVAILABLE or not all(target in root._modules for target in targets):
        return _compiled_by_fx(root, recording, class_name)
    module = nn.Module.__new__(_module_class(class_name))  # not GraphModule.__new__: see _module_class
    nn.Module.__init__(module)
    # straight into __dict__ (nn.Module.__setattr__ inspects every value): the submodules and
    # what GraphModule.__init__ sets besides the graph, for a graph of fx.Graph() (no tracer)
    module.__dict__.update(_modules={target: root._modules[target] for target in targets}, _graph_source=recording,
                           _tracer_cls=None, _tracer_extras={}, meta={}, _replace_hooks=[], _create_node_hooks=[],
                           _erase_node_hooks=[], _deepcopy_hooks=[], shape_env=None)
    _install_forward(module, recording)
    return module


def _compiled_by_fx(root: nn.Module, recording: codegen.Recording, class_name: str) -> CompiledModule:
    """The same module made by fx's constructor (and code generator) from the replayed graph;
    its graph is made again on first use, as for the others."""
    module = CompiledModule(root, recording.replay(), class_name=class_name)
    del module.__dict__["_graph"]
    module.__dict__["_graph_source"] = recording
    return module


_FX_CLASS_QUALNAME = "GraphModule.__new__.<locals>.GraphModuleImpl"


def _module_class(name: str) -> type:
    """A class of one module, as ``GraphModule.__new__`` makes it (fx keeps the forward on the
    class, so that each module runs its own): a direct subclass of CompiledModule, with fx's
    qualified name (which ``GraphModule.__new__`` skips when a copy of the module makes its class)."""
    cls = type("GraphModuleImpl", (CompiledModule,), {"__module__": fx_graph_module.__name__,
                                                       "__qualname__": _FX_CLASS_QUALNAME})
    cls.__name__ = name
    return cls


def _install_forward(module: CompiledModule, recording: codegen.Recording) -> None:
    """What ``GraphModule.recompile`` does, from ``recording`` rather than the module's own graph
    (not made yet): the code and its line map on the module, the forward (its source in
    linecache, for TorchScript and tracebacks) and fx's call wrapper (which prints the generated
    line an error comes from) on its class."""
    python_code = codegen.python_code(recording) or recording.replay().python_code(root_module="self")
    module.__dict__.update(_code=python_code.src, _lineno_map=python_code._lineno_map,
                           _prologue_start=python_code._prologue_start)
    cls = type(module)
    # {}: the _co_fields of a new graph, which recompile would read
    cls.forward = fx_graph_module._forward_from_src(python_code.src, python_code.globals, {})
    cls._wrapped_call = fx_graph_module._WrappedCall(cls, None)
    cls.__call__ = _call_wrapped
    for child in module._modules.values():  # recompile submodules, as fx does
        if isinstance(child, fx.GraphModule):
            child.recompile()


def _call_wrapped(self, *args, **kwargs):
    return self._wrapped_call(self, *args, **kwargs)


def _graph_of(source: codegen.Recording | fx.Graph, owning_module: nn.Module | None = None) -> fx.Graph:
    """A new fx graph of a module's source: the recording replayed, or a copy of the graph."""
    if isinstance(source, codegen.Recording):
        return source.replay(owning_module)
    graph = fx.Graph(owning_module=owning_module, tracer_cls=source._tracer_cls)
    graph.output(graph.graph_copy(source, {}))
    return graph


def _with_code_of(template: fx.GraphModule, root: nn.Module) -> CompiledModule:
    """A module holding ``root``'s submodules that runs ``template``'s generated forward: its
    code, a shared private source of its fx graph, and a class of its own beside the template's
    (fx keeps the forward on a class per module, so a later recompile of either module leaves
    the other alone)."""
    cls = type(template)  # fx's class for the template alone, made from (a subclass of) GraphModule
    bases = cls.__bases__ if isinstance(template, CompiledModule) else (CompiledModule,)
    own = type(cls.__name__, bases, {"forward": cls.forward})
    module = nn.Module.__new__(own)  # not GraphModule.__new__, which would make another class
    skip = ("_parameters", "_buffers", "_modules", "_graph", "_graph_source")
    module.__dict__.update({key: value.copy() if isinstance(value, (dict, set, list)) else value
                            for key, value in template.__dict__.items() if key not in skip})
    # straight into __dict__: nn.Module.__setattr__ inspects every value
    module.__dict__.update(_parameters={}, _buffers={}, _modules=dict(root._modules))
    module.__dict__["_graph_source"] = (template._private_source() if isinstance(template, CompiledModule)
                                        else _graph_of(template.graph))
    return module


def _first_entry(module: nn.Module, kind: str, floating: bool = False) -> torch.Tensor | None:
    """The first tensor of ``kind`` (``_parameters`` or ``_buffers``) in ``parameters()`` /
    ``buffers()`` order, by a walk that stops there (those set up a generator chain per call, and
    a rebuild asks for the network's dtype and device)."""
    for tensor in getattr(module, kind).values():
        if tensor is not None and (not floating or tensor.is_floating_point()):
            return tensor
    for child in module._modules.values():
        found = None if child is None else _first_entry(child, kind, floating)
        if found is not None:
            return found
    return None


@dataclass
class Network:
    """A layer graph and its compiled module (which holds the parameters)."""
    graph: LayerGraph
    module: fx.GraphModule

    @classmethod
    def build(cls, graph: LayerGraph, state: dict[str, torch.Tensor] | None = None, *,
              seed: int = 0, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> "Network":
        return cls(graph, compile_graph(graph, state, seed=seed, dtype=dtype, device=device))

    def _first_tensor(self) -> torch.Tensor | None:
        """The first parameter (in ``parameters()`` order), else the first floating-point buffer."""
        first = _first_entry(self.module, "_parameters")
        return _first_entry(self.module, "_buffers", floating=True) if first is None else first

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the parameters (the default dtype for a network without any)."""
        tensor = self._first_tensor()
        return torch.get_default_dtype() if tensor is None else tensor.dtype

    @property
    def device(self) -> torch.device:
        """Where the parameters live (the CPU for a network without any)."""
        tensor = self._first_tensor()
        tensor = next(self.module.buffers(), None) if tensor is None else tensor
        return torch.device("cpu") if tensor is None else tensor.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Network":
        """Move the parameters and buffers to ``device`` and cast the floating-point ones to
        ``dtype``, in place (as ``nn.Module.to``); returns the network."""
        self.module.to(device=device, dtype=dtype)
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)
