"""The op registry: everything the system knows about an op lives in one OpDef.

An op is registered by name. The spec reader validates arguments against ``OpDef.args``,
shape inference asks ``output_shape``, the compiler asks ``build_module`` (parametric ops,
compiled to ``call_module``) or ``function`` (stateless ops, compiled to ``call_function``),
the summary asks ``flops``. Passes ask further hooks that ops override where they apply.
"""
from __future__ import annotations

import math
from importlib import metadata
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from ..errors import GraphgrowError, did_you_mean
from ..init import dirac_

Shape = tuple[int, ...]
REQUIRED = object()


@dataclass(frozen=True)
class Geometry:
    """How a weight acts as a linear map: a convolution with kernel (out, in, k, k) on inputs
    of shape (in, H, W) with stride and zero padding. A linear weight (out, in) is the 1x1
    convolution on (in, 1, 1), so every weight norm (graphgrow.sensli) has one definition for
    both."""
    input_shape: tuple[int, int, int]
    stride: int = 1
    padding: int = 0

    def as_kernel(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if weight.dim() == 4 else weight.reshape(*weight.shape, 1, 1)


@dataclass(frozen=True)
class Arg:
    """One op argument: its name, a checker/converter and a default (REQUIRED if none)."""
    name: str
    check: Callable[[Any], Any]
    default: Any = REQUIRED
    doc: str = ""


def _type_error(expected: str, value: Any) -> GraphgrowError:
    hint = None
    if "integer" in expected and isinstance(value, float):  # most likely `${a / b}` where `//` was meant
        hint = "write an integer; in ${} expressions '/' gives a float, '//' an integer (${w // 2})"
    return GraphgrowError(f"expected {expected}, got {value!r} ({type(value).__name__})", hint=hint)


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _type_error("a positive integer", value)
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _type_error("a non-negative integer", value)
    return value


def integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error("an integer", value)
    return value


def number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _type_error("a finite number", value)
    return float(value)


def probability(value: Any) -> float:
    value = number(value)
    if not 0.0 <= value < 1.0:
        raise GraphgrowError(f"expected a probability in [0, 1), got {value}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error("true or false", value)
    return value


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``check`` that also accepts null (an argument whose default is worked out elsewhere)."""
    def checked(value: Any) -> Any:
        return None if value is None else check(value)
    checked.__name__ = f"optional({check.__name__})"
    return checked


def choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise GraphgrowError(f"expected one of {', '.join(map(repr, options))}, got {value!r}",
                                 hint=did_you_mean(str(value), options))
        return value
    check.__name__ = f"choice{options}"
    return check


def int_or(*options: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, str):
            return choice(*options)(value)
        return non_negative_int(value)
    return check


class OpDef:
    """Base class of an op. Subclasses override what applies to them.

    ``roles`` documents the parameter roles (``<node>.<role>`` in the compiled module);
    ``param_shapes`` gives their shapes for concrete arguments.
    """
    name: str = ""
    doc: str = ""
    args: Sequence[Arg] = ()
    min_inputs: int = 1
    max_inputs: int | None = 1
    roles: dict[str, str] = {}
    #: elementwise ops keep shapes and act per entry; passes may look through them.
    elementwise: bool = False

    # -- spec ---------------------------------------------------------------------------
    def check_args(self, raw: dict[str, Any],
                   where: Callable[[str], dict] = lambda key: {}) -> dict[str, Any]:
        """Validate and complete the arguments. ``where(key)`` gives the location fields
        (file, line, column) of an argument, so errors point at it."""
        known = {a.name: a for a in self.args}
        for key in raw:
            if key not in known:
                raise GraphgrowError(f"op '{self.name}' has no argument '{key}'",
                                     hint=did_you_mean(key, known) or
                                     (f"its arguments are: {', '.join(known)}" if known else
                                      f"'{self.name}' takes no arguments")).located(**where(key))
        checked = {}
        for arg in self.args:
            if arg.name in raw:
                try:
                    checked[arg.name] = arg.check(raw[arg.name])
                except GraphgrowError as err:
                    err.message = f"argument '{arg.name}' of op '{self.name}': {err.message}"
                    raise err.located(**where(arg.name))
            elif arg.default is REQUIRED:
                raise GraphgrowError(f"op '{self.name}' needs argument '{arg.name}'",
                                     hint=arg.doc or None).located(**where(""))
            else:
                checked[arg.name] = arg.default
        return checked

    # -- shapes and costs ---------------------------------------------------------------
    def output_shape(self, args: dict, in_shapes: list[Shape]) -> Shape:
        return in_shapes[0]

    def param_shapes(self, args: dict, in_shapes: list[Shape]) -> dict[str, Shape]:
        """Trainable parameters by role."""
        return {}

    def flops(self, args: dict, in_shapes: list[Shape], out_shape: Shape) -> int:
        """Floating point operations per sample in the forward pass (multiply-add = 2)."""
        return 0

    def input_gradient_flops(self, args: dict, in_shapes: list[Shape], out_shape: Shape) -> int:
        """FLOPs per sample of the gradient with respect to the input (backward pass without
        parameter gradients); about one forward pass for the built-in ops."""
        return self.flops(args, in_shapes, out_shape)

    def weight_geometry(self, args: dict, in_shapes: list[Shape], role: str) -> Geometry | None:
        """How the parameter ``role`` acts as a linear map (the SensLI merit norms, B.1a-e), or
        None for parameters that are not weight matrices or kernels (biases, scales)."""
        return None

    # -- gradients from a tapped forward/backward pass (graphgrow.sensli) -------------------
    def functional(self, args: dict, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The op's output for a batch ``x`` with parameters ``params`` (by role), computed
        without a module."""
        raise NotImplementedError(f"op '{self.name}' has no functional form")

    def parameter_gradients(self, args: dict, params: dict[str, torch.Tensor], x: torch.Tensor,
                            grad_out: torch.Tensor, roles: Sequence[str]) -> dict[str, torch.Tensor]:
        """Gradients (by role, for ``roles``) of the loss with respect to the op's parameters
        ``params``, summed over the batch, given its input batch ``x`` and the loss gradient
        ``grad_out`` at its output: the parameter-gradient part of a backward pass, without the
        input gradient."""
        raise NotImplementedError(f"op '{self.name}' has no parameter-gradient rule")

    def parameter_gradient_flops(self, args: dict, in_shapes: list[Shape], out_shape: Shape,
                                 roles: Sequence[str]) -> int:
        """FLOPs per sample of ``parameter_gradients`` for ``roles``."""
        raise NotImplementedError(f"op '{self.name}' has no parameter-gradient rule")

    # -- compilation --------------------------------------------------------------------
    def build_module(self, args: dict, in_shapes: list[Shape]) -> nn.Module | None:
        """The module for a ``call_module`` node, or None for a stateless op."""
        return None

    def module_sizes(self, args: dict, in_shapes: list[Shape]) -> dict[str, Any] | None:
        """The attributes of ``build_module``'s module that hold sizes (by dotted path, e.g.
        ``out_features``; plain instance attributes, which the copy's ``__dict__`` takes), or
        None. With them a pass that changes only sizes (widen, prune) sets them on a copy of the
        old module holding the new tensors, instead of building and initialising a fresh module
        and loading the tensors into it (most of such a rebuild)."""
        return None

    def module_args(self, args: dict) -> dict:
        """``args`` as ``build_module`` reads them: two nodes whose module arguments differ only in
        ``width_arg`` have modules that differ only in sizes (e.g. padding 'same' or its number)."""
        return args

    def function(self, args: dict) -> tuple[Callable, dict[str, Any]]:
        """The callable and keyword arguments for a ``call_function`` node."""
        raise NotImplementedError(self.name)

    def emit(self, graph: fx.Graph, name: str, args: dict, inputs: list[fx.Node],
             as_module: bool) -> fx.Node:
        """Add this node to ``graph`` through ``graph.create_node(op, target, args, kwargs, name=...)``
        (compile_graph hands in a recording that has fx.Graph's create_node and nothing else of
        it); ops with several inputs may emit a small subgraph."""
        if as_module:
            return graph.create_node("call_module", name, tuple(inputs), {}, name=name)
        fn, kwargs = self.function(args)
        return graph.create_node("call_function", fn, tuple(inputs), kwargs, name=name)

    # -- import from existing torch code (graphgrow.importer) --------------------------------
    #: torch module types, call_function targets and tensor method names this op is imported
    #: from; where several ops claim one, the importer takes the latest registered op whose
    #: ``args_from_module`` / ``args_from_traced`` accepts the call (so a user's op can win)
    imports_modules: tuple[type, ...] = ()
    imports_functions: tuple[Callable, ...] = ()
    imports_methods: tuple[str, ...] = ()
    #: a module (or call) returning a tuple whose element at this index is the op's value
    #: (nn.MultiheadAttention returns (output, weights))
    tuple_output: int | None = None

    def args_from_module(self, module: nn.Module) -> dict[str, Any]:
        """Op arguments reproducing ``module`` (a type in ``imports_modules``); a
        GraphgrowError if it uses a setting the op cannot express."""
        return {}

    def args_from_call(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Op arguments from the non-tensor arguments of a traced call."""
        return {}

    def args_from_traced(self, args: tuple, kwargs: dict, in_shapes: list[Shape], out_shape: Shape) -> dict[str, Any]:
        """Op arguments of a traced call whose per-sample input and output shapes are known (shape
        ops derive theirs from the shapes); by default ``args_from_call``."""
        return self.args_from_call(args, kwargs)

    def args_from_constants(self, args: dict[str, Any], constants: dict[int | str, torch.Tensor]) -> dict[str, Any]:
        """Op arguments ``args`` completed by the constant tensors (module buffers, attributes) a
        traced call passes, by position in the call or keyword (a causal attention mask sets
        ``causal``); a GraphgrowError for a constant the op cannot express. By default ``args``."""
        return args

    #: the roles of the tensor arguments after the input of a functional call that passes the
    #: op's parameters (F.linear(x, self.weight, self.bias)): the importer adopts them
    adopted_roles: tuple[str, ...] = ()

    def args_from_parameters(self, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> dict[str, Any]:
        """Op arguments of a functional call given its parameters by role (``adopted_roles``)
        and its other arguments."""
        raise GraphgrowError(f"op '{self.name}' does not adopt parameters")

    def inputs_from_call(self, inputs: list, kwargs: dict) -> list:
        """The op's inputs among the tensor arguments of a traced call (``kwargs``: its keyword
        arguments); a GraphgrowError for a call the op cannot express."""
        return inputs

    def torch_module(self, args: dict) -> nn.Module | None:
        """A stateless op's nn.Module twin (residual activations; ``compile_graph(...,
        stateless_as_modules=True)`` for tools such as BackPACK that trace modules only)."""
        return None

    def default_init(self, module: nn.Module, args: dict, generator: torch.Generator) -> None:
        """Initialise a freshly built module's parameters from ``generator``."""

    # -- graph rewrites (the ``passes`` package) --------------------------------------------
    #: unit i (features of a vector, channels of an image) of the input is unit i of the
    #: output: elementwise ops, pooling, dropout, batchnorm, flatten. Widening looks through.
    passes_units_through: bool = False
    #: passes units through wherever they sit (elementwise ops, dropout, stochastic depth), also
    #: on the last dimension of tokens (N, D) that a linear layer's units occupy; the other
    #: pass-through ops (pooling, batchnorm, flatten) hold them on the first dimension only
    passes_units_anywhere: bool = False
    #: sigma(sigma(x)) == sigma(x): after such an activation, an identity-initialised layer
    #: followed by the same activation computes the identity (thesis 4.11, 4.15).
    idempotent: bool = False
    #: the argument holding the number of output units of a widenable op
    width_arg: str | None = None
    #: the argument counting an op's heads (attention): inner units that ``widen`` adds with
    #: zero outgoing weights; ``head_roles`` and ``head_dim`` describe where they sit
    head_arg: str | None = None
    #: the per-sample dimension of the input that holds a widenable op's input units
    input_units_dim: int = 0
    #: why units cannot flow into this op, for the error of a refused widening
    widen_refusal: str | None = None
    #: every input and the output hold the same units (add, a residual block x + F(x)), so
    #: widening one of them widens all; the op's ``widen_roles`` name the axes of its own
    #: parameters on those units (passes/units.py, coupled groups)
    ties_units: bool = False

    def input_unit_offsets(self, args: dict, in_shapes: list[Shape]) -> list[int] | None:
        """Where the units of each input start on the output's first per-sample dimension, for
        ops that place their inputs side by side there (concat); None for other ops."""
        return None

    #: op(0) == 0 with its parameters as they are (on every input that is zero): a block whose
    #: branch ends in such ops is zero when the layer before them is (passes.blocks)
    maps_zero_to_zero: bool = False
    #: every output entry is a selection, maximum or mean of input entries, so values in an
    #: interval stay in it (pooling, shape ops): after relu the values stay relu's fixed points
    keeps_range: bool = False
    #: arguments that act in train mode only and hold no parameters (a drop rate): blocks that
    #: differ only in them are equal for depth hierarchies (passes.hierarchy), e.g. ConvNeXt's
    #: stochastic-depth rate rising block by block
    train_only_args: tuple[str, ...] = ()

    def zero_output_roles(self, args: dict, in_shapes: list[Shape]) -> tuple[str, ...] | None:
        """The parameter roles which, set to zero, make the op's output zero for every input
        while the other roles keep a non-zero gradient (a block's "last layer zero"), or None
        when no parameters do. By default all roles of an op with parameters."""
        return tuple(self.param_shapes(args, in_shapes)) or None

    def widens(self, args: dict) -> bool:
        """Whether ``width_arg`` can grow (and the op take more input units) for these arguments."""
        return self.width_arg is not None

    def widen_roles(self, args: dict) -> dict[str, tuple[int | None, int | None]]:
        """Per parameter role of a widenable op: (axis of its output units, axis of its input
        units), None where the role has no such axis."""
        return {}

    def unit_roles(self, args: dict) -> dict[str, float]:
        """Per-unit state of a ``passes_units_through`` op (role -> value of a fresh unit)."""
        return {}

    def identity_roles(self, args: dict, in_shapes: list[Shape], scale: float = 1.0) -> dict[str, float] | None:
        """The roles that hold a multiple of the identity (a unit matrix; a Dirac kernel for a
        convolution), with that multiple, when this op computes the identity on its input and
        every other parameter is zero; None when no choice of parameters does. ``scale`` is the
        constant c of W1 = c I (4.13)."""
        return None

    def identity_params(self, args: dict, in_shapes: list[Shape],
                        scale: float = 1.0) -> dict[str, torch.Tensor] | None:
        """Parameters (by role) that make this op compute the identity on its input
        (``identity_roles``), or None when no choice of parameters does."""
        roles = self.identity_roles(args, in_shapes, scale)
        return None if roles is None else identity_values(self.param_shapes(args, in_shapes), roles)

    def __repr__(self) -> str:
        return f"<op {self.name}>"


_REGISTRY: dict[str, OpDef] = {}
#: installed packages add ops (or replace shipped ones) under this entry-point group; they are
#: registered before the first op is looked up, so the CLI reads specs that use them
ENTRY_POINT_GROUP = "graphgrow.ops"
_entry_points_loaded = False


def register_op(op: OpDef | type[OpDef], *, replace: bool = False) -> OpDef:
    """Register an op (an OpDef instance or class) under ``op.name``; returns the instance.

    Custom ops are registered from Python, never named by import path in a spec.
    """
    if isinstance(op, type):
        op = op()
    if not op.name or not op.name.replace("_", "").isalnum():
        raise ValueError(f"invalid op name {op.name!r}")
    if op.name in _REGISTRY and not replace:
        raise ValueError(f"op {op.name!r} is already registered (pass replace=True)")
    _REGISTRY.pop(op.name, None)  # a replacing op counts as registered last (import prefers it)
    _REGISTRY[op.name] = op
    return op


def _load_entry_points() -> None:
    """Register the ops of installed packages (entry point value: an OpDef class or instance)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_op(entry.load(), replace=True)
        except Exception as err:  # a broken plugin names itself instead of failing somewhere later
            raise GraphgrowError(f"cannot load op '{entry.name}' from entry point {entry.value}: {err}",
                                 hint=f"check the package that declares it under '{ENTRY_POINT_GROUP}'") from None


def get_op(name: Any) -> OpDef:
    """The registered op called ``name``; a GraphgrowError with a hint if there is none."""
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise GraphgrowError(f"unknown op {name!r}",
                             hint=did_you_mean(str(name), _REGISTRY) or
                             f"known ops: {', '.join(sorted(_REGISTRY))}") from None


def registered_ops() -> dict[str, OpDef]:
    """Every op by name, in registration order."""
    _load_entry_points()
    return dict(_REGISTRY)


def require(condition: bool, what: str) -> None:
    """For importers: refuse a torch setting the op cannot express."""
    if not condition:
        raise GraphgrowError(f"unsupported setting: {what}")


def numel(shape: Shape) -> int:
    return math.prod(shape)


_IDENTITIES = {"identity": lambda shape: torch.eye(*shape), "dirac": lambda shape: dirac_(torch.empty(shape))}


def _identity_form(shape: Shape) -> str:
    """The identity of a parameter of ``shape``: a unit matrix, or a convolution's Dirac kernel."""
    return "identity" if len(shape) == 2 else "dirac"


def identity_values(shapes: dict[str, Shape], roles: dict[str, float]) -> dict[str, torch.Tensor]:
    """Parameters of ``shapes`` (by role): ``roles[role]`` times the identity for the roles in
    ``roles`` (``identity_init`` names each), zeros for the others."""
    values = {}
    for role, shape in shapes.items():
        scale = roles.get(role, 0.0)
        if scale == 0.0:
            values[role] = torch.zeros(shape)
            continue
        identity = _IDENTITIES[_identity_form(shape)](shape)
        values[role] = identity if scale == 1.0 else identity.mul_(scale)
    return values


def identity_init(shape: Shape, scale: float) -> str:
    """The name of ``scale`` times the identity of ``shape`` as ``identity_values`` makes it:
    ``zeros``, ``identity`` / ``dirac``, or the multiple of one (``0.5*identity``)."""
    if scale == 0.0:
        return "zeros"
    form = _identity_form(shape)
    return form if scale == 1.0 else f"{scale:g}*{form}"


def kaiming_uniform_init(weight: torch.Tensor, bias: torch.Tensor | None,
                         generator: torch.Generator) -> None:
    """PyTorch's default Linear/Conv initialisation, drawn from an explicit generator."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        if bias is not None:
            fan_in = numel(tuple(weight.shape[1:]))
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(bias, -bound, bound, generator=generator)
