"""Every built-in op: compiled result against a direct torch computation (float64), its shape
rule, parameter roles and shapes, FLOPs against an independent count, argument validation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from graphgrow.compiler import compile_graph
from graphgrow.errors import GraphgrowError
from graphgrow.init import dirac_
from graphgrow.ir import graph_from_text
from graphgrow.ops import registered_ops
from graphgrow.ops.attention import HeadAttention

BATCH = 3


def values_of_every_node(module: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The value each fx node computes, by node name."""
    seen = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            seen[n.name] = super().run_node(n)
            return seen[n.name]

    Recorder(module).run(x)
    return seen


def unfold_windows(x, kernel, stride, padding=0):
    """(B, C, k*k, Hout, Wout) windows of an image batch, built by slicing (no torch conv/pool)."""
    x = F.pad(x, (padding,) * 4)
    height = (x.shape[2] - kernel) // stride + 1
    width = (x.shape[3] - kernel) // stride + 1
    windows = [x[:, :, i:i + stride * (height - 1) + 1:stride, j:j + stride * (width - 1) + 1:stride]
               for i in range(kernel) for j in range(kernel)]
    return torch.stack(windows, dim=2)


def conv_reference(x, weight, bias, stride, padding):
    windows = unfold_windows(x, weight.shape[-1], stride, padding)  # B, C, kk, H, W
    out = torch.einsum("bckhw,ock->bohw", windows, weight.flatten(2))
    return out if bias is None else out + bias[None, :, None, None]


def norm_reference(x, dims, eps, weight, bias):
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def residual_reference(x, p, h, act, conv):
    inner = conv_reference(x, p["inner.weight"], p.get("inner.bias"), 1, p["inner.weight"].shape[-1] // 2) \
        if conv else x @ p["inner.weight"].T + p.get("inner.bias", 0)
    hidden = act(inner)
    if "outer.weight" in p:
        hidden = conv_reference(hidden, p["outer.weight"], None, 1, p["outer.weight"].shape[-1] // 2) \
            if conv else hidden @ p["outer.weight"].T
    return x + h * hidden


def numel(shape):
    return math.prod(shape)


def grouped_conv_reference(x, weight, bias, stride, padding, groups):
    """Each group of input channels convolved with its own group of kernels."""
    cin, cout = x.shape[1] // groups, weight.shape[0] // groups
    return torch.cat([conv_reference(x[:, g * cin:(g + 1) * cin], weight[g * cout:(g + 1) * cout],
                                     None if bias is None else bias[g * cout:(g + 1) * cout], stride, padding)
                      for g in range(groups)], dim=1)


def max_pool_reference(x, kernel, stride, pad_before, pad_after):
    """Max over windows of the input padded with -inf (pad_after: extra room of ceil_mode)."""
    x = F.pad(x, (pad_before, pad_after, pad_before, pad_after), value=-math.inf)
    return unfold_windows(x, kernel, stride).amax(dim=2)


def attention_reference(x, p, heads, causal=False, ignored_keys=None, head_dim=None):
    """Multi-head self-attention written out: projections, per-head softmax(q k^T / sqrt(d)) v
    (d = head_dim, default width / heads); the weights of keys after the query (causal) and of
    ``ignored_keys`` (batch, tokens) zero."""
    batch, tokens, width = x.shape
    d = head_dim or width // heads
    q, k, v = (x @ w.T + b for w, b in zip(p["in_proj_weight"].chunk(3), p["in_proj_bias"].chunk(3)))
    split = lambda t: t.reshape(batch, tokens, heads, d).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
    kept = torch.ones(batch, 1, tokens, tokens, dtype=torch.bool)
    if causal:
        kept = kept & torch.ones(tokens, tokens, dtype=torch.bool).tril()
    if ignored_keys is not None:
        kept = kept & ~ignored_keys[:, None, None, :]
    weights = torch.exp(scores) * kept
    weights = weights / weights.sum(-1, keepdim=True)
    merged = (weights @ split(v)).transpose(1, 2).reshape(batch, tokens, heads * d)
    return merged @ p["out_proj.weight"].T + p["out_proj.bias"]


def causal_attention_reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v with the keys after each query masked out."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1)
    weights = torch.exp(scores.masked_fill(future, -math.inf))
    return weights / weights.sum(-1, keepdim=True) @ v


def counted_attention_flops(in_shapes):
    """torch's count of the two products of attention on one sample, written as matmuls (its
    counter does not see inside the CPU kernel of F.scaled_dot_product_attention)."""
    q, k, v = (torch.zeros(1, *s) for s in in_shapes)
    with FlopCounterMode(display=False) as counter:
        (q @ k.transpose(-1, -2)) @ v
    return counter.get_total_flops()


def masked_attention_reference(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v for a float mask."""
    weights = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask)
    return weights / weights.sum(-1, keepdim=True) @ v


class Tokens(tuple):
    """The input shape of a case whose input holds token ids below ``vocabulary``."""

    def __new__(cls, shape, vocabulary):
        self = super().__new__(cls, shape)
        self.vocabulary = vocabulary
        return self


def input_line(shape) -> str:
    tokens = f", tokens: {shape.vocabulary}" if isinstance(shape, Tokens) else ""
    return f"input: {{shape: {list(shape)}{tokens}}}"


def case_input(shape, batch, seed) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if isinstance(shape, Tokens):
        return torch.randint(0, shape.vocabulary, (batch, *shape), generator=generator)
    return torch.randn(batch, *shape, dtype=torch.float64, generator=generator)


relu6 = lambda t: torch.where(t < 0, 0.0, torch.where(t > 6, 6.0, t))


sigmoid = lambda t: 1 / (1 + torch.exp(-t))
tanh = lambda t: (torch.exp(t) - torch.exp(-t)) / (torch.exp(t) + torch.exp(-t))

# name, layers, input shape, reference(inputs, params, node) -> output, elementwise FLOPs besides
# matmuls/convs (counted by torch's FlopCounterMode) as f(in_shapes, out_shape)
CASES = [
    ("linear", ["{name: t, op: linear, out: 3}"], (4,),
     lambda xs, p: xs[0] @ p["weight"].T + p["bias"], lambda i, o: numel(o)),
    ("linear_no_bias_rank2", ["{name: t, op: linear, out: 3, bias: false}"], (2, 5),
     lambda xs, p: xs[0] @ p["weight"].T, lambda i, o: 0),
    ("conv2d_same", ["{name: t, op: conv2d, out: 3, kernel: 3}"], (2, 6, 6),
     lambda xs, p: conv_reference(xs[0], p["weight"], p["bias"], 1, 1), lambda i, o: numel(o)),
    ("conv2d_stride_valid", ["{name: t, op: conv2d, out: 4, kernel: 3, stride: 2, padding: 0, bias: false}"],
     (2, 7, 7), lambda xs, p: conv_reference(xs[0], p["weight"], None, 2, 0), lambda i, o: 0),
    ("conv2d_kernel5_pad1", ["{name: t, op: conv2d, out: 2, kernel: 5, padding: 1}"], (1, 6, 5),
     lambda xs, p: conv_reference(xs[0], p["weight"], p["bias"], 1, 1), lambda i, o: numel(o)),
    ("relu", ["{name: t, op: relu}"], (5,), lambda xs, p: torch.where(xs[0] > 0, xs[0], 0.0),
     lambda i, o: numel(o)),
    ("tanh", ["{name: t, op: tanh}"], (5,), lambda xs, p: tanh(xs[0]), lambda i, o: 4 * numel(o)),
    ("sigmoid", ["{name: t, op: sigmoid}"], (2, 3), lambda xs, p: sigmoid(xs[0]), lambda i, o: 4 * numel(o)),
    ("gelu", ["{name: t, op: gelu}"], (5,),
     lambda xs, p: 0.5 * xs[0] * (1 + torch.erf(xs[0] / math.sqrt(2))), lambda i, o: 8 * numel(o)),
    ("softplus", ["{name: t, op: softplus}"], (5,), lambda xs, p: torch.log(1 + torch.exp(xs[0])),
     lambda i, o: 4 * numel(o)),
    ("identity", ["{name: t, op: identity}"], (1, 3, 3), lambda xs, p: xs[0], lambda i, o: 0),
    ("leaky_relu", ["{name: t, op: leaky_relu, slope: 0.2}"], (5,),
     lambda xs, p: torch.where(xs[0] > 0, xs[0], 0.2 * xs[0]), lambda i, o: numel(o)),
    ("scale", ["{name: t, op: scale, factor: -2.5}"], (4,), lambda xs, p: -2.5 * xs[0], lambda i, o: numel(o)),
    ("batchnorm_flat", ["{name: t, op: batchnorm, eps: 0.001}"], (3,),
     lambda xs, p: norm_reference(xs[0], (0,), 1e-3, p["weight"], p["bias"]), lambda i, o: 4 * numel(o)),
    ("batchnorm_image", ["{name: t, op: batchnorm}"], (2, 3, 3),
     lambda xs, p: norm_reference(xs[0], (0, 2, 3), 1e-5, p["weight"][:, None, None], p["bias"][:, None, None]),
     lambda i, o: 4 * numel(o)),
    ("layernorm", ["{name: t, op: layernorm}"], (2, 4),
     lambda xs, p: norm_reference(xs[0], (1, 2), 1e-5, p["weight"], p["bias"]), lambda i, o: 5 * numel(o)),
    ("dropout_eval", ["{name: t, op: dropout, p: 0.3}"], (6,), lambda xs, p: xs[0], lambda i, o: numel(o)),
    ("flatten", ["{name: t, op: flatten}"], (2, 3, 4), lambda xs, p: xs[0].reshape(len(xs[0]), -1),
     lambda i, o: 0),
    ("add_three", ["{name: a, op: scale, factor: 2}", "{name: b, op: tanh, inputs: input}",
                   "{name: t, op: add, inputs: [a, b, input]}"], (4,),
     lambda xs, p: xs[0] + xs[1] + xs[2], lambda i, o: 2 * numel(o)),
    ("concat_features", ["{name: a, op: linear, out: 2}", "{name: t, op: concat, inputs: [input, a]}"], (3,),
     lambda xs, p: torch.stack([*xs[0].T, *xs[1].T], dim=1), lambda i, o: 0),
    ("concat_channels", ["{name: a, op: conv2d, out: 2}", "{name: t, op: concat, inputs: [a, input], dim: 1}"],
     (1, 3, 3), lambda xs, p: torch.stack([xs[0][:, 0], xs[0][:, 1], xs[1][:, 0]], dim=1), lambda i, o: 0),
    ("concat_width_negative_dim", ["{name: a, op: scale, factor: 3}", "{name: t, op: concat, inputs: [input, a], dim: -1}"],
     (1, 2, 2), lambda xs, p: torch.stack([xs[0][..., 0], xs[0][..., 1], xs[1][..., 0], xs[1][..., 1]], dim=-1),
     lambda i, o: 0),
    ("maxpool2d", ["{name: t, op: maxpool2d, kernel: 2}"], (2, 5, 5),
     lambda xs, p: unfold_windows(xs[0], 2, 2).amax(dim=2), lambda i, o: 4 * numel(o)),
    ("maxpool2d_stride1", ["{name: t, op: maxpool2d, kernel: 3, stride: 1}"], (1, 4, 5),
     lambda xs, p: unfold_windows(xs[0], 3, 1).amax(dim=2), lambda i, o: 9 * numel(o)),
    ("avgpool2d", ["{name: t, op: avgpool2d, kernel: 3, stride: 2}"], (1, 7, 7),
     lambda xs, p: unfold_windows(xs[0], 3, 2).mean(dim=2), lambda i, o: 9 * numel(o)),
    ("adaptive_avgpool2d_global", ["{name: t, op: adaptive_avgpool2d}"], (3, 4, 4),
     lambda xs, p: xs[0].mean(dim=(2, 3), keepdim=True), lambda i, o: numel(i[0])),
    ("adaptive_avgpool2d_blocks", ["{name: t, op: adaptive_avgpool2d, out: 2}"], (1, 4, 6),
     lambda xs, p: xs[0].reshape(len(xs[0]), 1, 2, 2, 2, 3).mean(dim=(3, 5)), lambda i, o: numel(i[0])),
    ("residual_two_weight_tanh", ["{name: t, op: residual, activation: tanh, h: 0.5}"], (3,),
     lambda xs, p: residual_reference(xs[0], p, 0.5, tanh, False), lambda i, o: numel(o) * (1 + 4 + 2)),
    ("residual_one_weight_relu_nobias", ["{name: t, op: residual, form: one_weight, bias: false}"], (4,),
     lambda xs, p: residual_reference(xs[0], p, 1.0, torch.relu, False), lambda i, o: numel(o) * (1 + 2)),
    ("residual_conv_one_weight_sigmoid", ["{name: t, op: residual, branch: conv2d, form: one_weight, "
                                          "activation: sigmoid, h: 0.25}"], (2, 4, 4),
     lambda xs, p: residual_reference(xs[0], p, 0.25, sigmoid, True), lambda i, o: numel(o) * (1 + 4 + 2)),
    ("residual_conv_two_weight_k5", ["{name: t, op: residual, branch: conv2d, kernel: 5, activation: leaky_relu}"],
     (2, 5, 5), lambda xs, p: residual_reference(xs[0], p, 1.0, lambda t: F.leaky_relu(t, 0.01), True),
     lambda i, o: numel(o) * (1 + 1 + 2)),
    ("conv2d_grouped", ["{name: t, op: conv2d, out: 4, groups: 2}"], (6, 5, 5),
     lambda xs, p: grouped_conv_reference(xs[0], p["weight"], p["bias"], 1, 1, 2), lambda i, o: numel(o)),
    ("conv2d_depthwise_stride", ["{name: t, op: conv2d, out: 3, groups: 3, stride: 2, bias: false}"], (3, 6, 6),
     lambda xs, p: grouped_conv_reference(xs[0], p["weight"], None, 2, 1, 3), lambda i, o: 0),
    ("maxpool2d_padded", ["{name: t, op: maxpool2d, kernel: 3, stride: 2, padding: 1}"], (2, 6, 6),
     lambda xs, p: max_pool_reference(xs[0], 3, 2, 1, 1), lambda i, o: 9 * numel(o)),
    ("maxpool2d_ceil_mode", ["{name: t, op: maxpool2d, kernel: 3, stride: 2, ceil_mode: true}"], (1, 6, 6),
     lambda xs, p: max_pool_reference(xs[0], 3, 2, 0, 1), lambda i, o: 9 * numel(o)),
    ("avgpool2d_padded", ["{name: t, op: avgpool2d, kernel: 3, stride: 1, padding: 1}"], (1, 4, 4),
     lambda xs, p: unfold_windows(xs[0], 3, 1, 1).mean(dim=2), lambda i, o: 9 * numel(o)),
    ("relu6", ["{name: a, op: scale, factor: 4}", "{name: t, op: relu6}"], (5,), lambda xs, p: relu6(xs[0]),
     lambda i, o: 2 * numel(o)),
    ("silu", ["{name: t, op: silu}"], (5,), lambda xs, p: xs[0] * sigmoid(xs[0]), lambda i, o: 5 * numel(o)),
    ("hardswish", ["{name: t, op: hardswish}"], (5,), lambda xs, p: xs[0] * relu6(xs[0] + 3) / 6,
     lambda i, o: 4 * numel(o)),
    ("hardsigmoid", ["{name: t, op: hardsigmoid}"], (5,), lambda xs, p: relu6(xs[0] + 3) / 6,
     lambda i, o: 3 * numel(o)),
    ("multiply_gate", ["{name: g, op: mean, dims: [2, 3], keepdim: true}", "{name: t, op: multiply, inputs: [input, g]}"],
     (2, 3, 3), lambda xs, p: xs[0] * xs[1], lambda i, o: numel(o)),
    ("mean_positions", ["{name: t, op: mean, dims: [2, -1]}"], (2, 3, 4),
     lambda xs, p: xs[0].sum(dim=(2, 3)) / 12, lambda i, o: numel(i[0])),
    ("concat_single", ["{name: t, op: concat, inputs: [input]}"], (2, 3), lambda xs, p: xs[0], lambda i, o: 0),
    ("flatten_positions", ["{name: t, op: flatten, start: 2}"], (2, 3, 4),
     lambda xs, p: torch.stack([xs[0][:, :, i, j] for i in range(3) for j in range(4)], dim=2), lambda i, o: 0),
    ("reshape_inferred", ["{name: t, op: reshape, shape: [3, -1]}"], (2, 6),
     lambda xs, p: torch.stack([xs[0].flatten(1)[:, 4 * r:4 * r + 4] for r in range(3)], dim=1), lambda i, o: 0),
    ("permute", ["{name: t, op: permute, dims: [0, 3, 1, 2]}"], (2, 3, 4),
     lambda xs, p: torch.einsum("bcij->bjci", xs[0]), lambda i, o: 0),
    ("transpose_negative", ["{name: t, op: transpose, dim0: 1, dim1: -1}"], (2, 3, 4),
     lambda xs, p: torch.einsum("bcij->bjic", xs[0]), lambda i, o: 0),
    ("select_token", ["{name: t, op: select, dim: 1, index: 0}"], (3, 4), lambda xs, p: xs[0][:, 0], lambda i, o: 0),
    ("narrow", ["{name: t, op: narrow, dim: 2, start: 1, length: 2}"], (3, 4),
     lambda xs, p: xs[0][:, :, 1:3], lambda i, o: 0),
    ("stochastic_depth_eval", ["{name: t, op: stochastic_depth, p: 0.3}"], (2, 3), lambda xs, p: xs[0],
     lambda i, o: numel(o)),
    ("layernorm_tokens", ["{name: t, op: layernorm, dims: 1}"], (3, 4),
     lambda xs, p: norm_reference(xs[0], (2,), 1e-5, p["weight"], p["bias"]), lambda i, o: 5 * numel(o)),
    ("parameter_expanded", ["{name: token, op: parameter, shape: [1, 4], init: {normal: {std: 1}}}",
                            "{name: t, op: expand_batch, inputs: [token, input]}"], (2, 3),
     lambda xs, p: xs[0].expand(BATCH, 1, 4), lambda i, o: 0),
    ("attention", ["{name: t, op: attention, heads: 2}"], (3, 4),
     lambda xs, p: attention_reference(xs[0], p, 2),
     lambda i, o: 4 * numel(o) + numel(o) + 5 * 2 * 3 * 3),
    ("attention_causal", ["{name: t, op: attention, heads: 2, causal: true}"], (3, 4),
     lambda xs, p: attention_reference(xs[0], p, 2, causal=True),
     lambda i, o: 4 * numel(o) + numel(o) + 5 * 2 * 3 * 3),
    ("attention_key_padding", ["{name: r, op: relu}", "{name: k, op: select, dim: 2, index: 0}",
                               "{name: m, op: equal, value: 0}",
                               "{name: t, op: attention, heads: 1, inputs: [input, m]}"], (4, 2),
     lambda xs, p: attention_reference(xs[0], p, 1, ignored_keys=xs[1]),
     lambda i, o: 4 * numel(o) + numel(o) + 5 * 1 * 4 * 4),
    ("equal", ["{name: t, op: equal, value: 2}"], Tokens((5,), 4), lambda xs, p: xs[0] == 2, lambda i, o: 0),
    ("embedding", ["{name: t, op: embedding, tokens: 6, dim: 3, padding: 1}"], Tokens((2, 4), 6),
     lambda xs, p: torch.stack([p["weight"][i] for i in xs[0].flatten()]).reshape(*xs[0].shape, 3),
     lambda i, o: 0),
    ("positions", ["{name: p, op: positions}", "{name: e, op: embedding, tokens: 5, dim: 3, inputs: [p]}",
                   "{name: t, op: expand_batch, inputs: [e, input]}"], Tokens((5,), 4),
     lambda xs, p: xs[0].expand(BATCH, 5, 3), lambda i, o: 0),
    ("scaled_dot_product_attention_mask",
     ["{name: m, op: narrow, dim: 2, start: 0, length: 1}",
      "{name: t, op: scaled_dot_product_attention, inputs: [input, input, input, m]}"], (2, 3, 3),
     lambda xs, p: masked_attention_reference(xs[0], xs[1], xs[2], xs[3]),
     lambda i, o: counted_attention_flops(i[:3]) + 6 * 2 * 3 * 3),
    ("attention_head_dim", ["{name: t, op: attention, heads: 3, head_dim: 2}"], (3, 4),
     lambda xs, p: attention_reference(xs[0], p, 3, head_dim=2),
     lambda i, o: (3 * 6 + 4) * 3 + 3 * 6 + 5 * 3 * 3 * 3 + counted_attention_flops([(3, 3, 2)] * 3)),
    ("scaled_dot_product_attention_causal",
     ["{name: q, op: scale, factor: 0.5}", "{name: t, op: scaled_dot_product_attention, inputs: [q, input, input], "
      "causal: true}"], (2, 4, 3), lambda xs, p: causal_attention_reference(xs[0], xs[1], xs[2]),
     lambda i, o: counted_attention_flops(i) + 6 * 2 * 4 * 4),
]
CASE_IDS = [case[0] for case in CASES]


def build(layers, shape):
    text = (f"graphgrow: 1\nname: op_test\n{input_line(shape)}\nlayers:\n"
            + "".join(f"  - {layer}\n" for layer in layers) + "outputs: [t]\n")
    graph = graph_from_text(text)
    module = compile_graph(graph, seed=11, dtype=torch.float64)
    with torch.no_grad():  # move norm layers off their identity initialisation
        for name, param in module.named_parameters():
            if name.startswith("t.") and param.dim() == 1:
                param.copy_(torch.linspace(0.5, 1.5, param.numel(), dtype=torch.float64))
    return graph, module


def node_params(module, name):
    submodule = module.get_submodule(name) if hasattr(module, name) else None
    return {} if submodule is None else {k: v.detach() for k, v in submodule.named_parameters()}


def test_every_builtin_op_has_a_case():
    builtin = {name for name, op in registered_ops().items() if type(op).__module__.startswith("graphgrow.ops")}
    covered = {node.op for c in CASES for node in graph_from_text(
        f"graphgrow: 1\nname: n\n{input_line(c[2])}\nlayers:\n"
        + "".join(f"  - {layer}\n" for layer in c[1]) + "outputs: [t]\n").nodes}
    assert builtin <= covered, f"ops without a unit case: {sorted(builtin - covered)}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_op_matches_direct_computation(case):
    _, layers, shape, reference, _ = case
    graph, module = build(layers, shape)
    module.train(case[0].startswith("batchnorm"))  # batchnorm in train mode: batch statistics
    x = case_input(shape, BATCH, seed=5)
    values = values_of_every_node(module, x)
    node = graph.node("t")
    inputs = [values["x" if i == "input" else i] for i in node.inputs]
    expected = reference(inputs, node_params(module, "t"))
    assert values["t"].dtype == (torch.bool if node.op == "equal" else torch.float64)
    torch.testing.assert_close(values["t"], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shape_rule_matches_the_real_output(case):
    _, layers, shape, _, _ = case
    graph, module = build(layers, shape)
    module.eval()
    out = module(case_input(shape, 2, seed=0))
    node = graph.node("t")
    assert tuple(out.shape) == (2, *node.out_shape)
    assert node.in_shapes == [graph.shape_of(i) for i in node.inputs]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parameter_roles_and_shapes(case):
    _, layers, shape, _, _ = case
    graph, module = build(layers, shape)
    node = graph.node("t")
    real = {k: tuple(v.shape) for k, v in node_params(module, "t").items()}
    assert node.param_shapes() == real
    assert set(real) <= set(node.opdef.roles)
    assert node.num_params() == sum(numel(s) for s in real.values())
    assert graph.num_params() == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_flops_against_an_independent_count(case):
    _, layers, shape, _, elementwise = case
    graph, module = build(layers, shape)
    node = graph.node("t")
    submodule = module.get_submodule("t") if hasattr(module, "t") else None
    matmul_flops = 0
    if submodule is not None:
        probe = torch.zeros(1, *node.in_shapes[0], dtype=torch.float64)
        with FlopCounterMode(display=False) as counter:  # attention reads its input thrice (q, k, v)
            submodule.eval()(*(probe,) * (3 if isinstance(submodule, (nn.MultiheadAttention, HeadAttention)) else 1))
        matmul_flops = counter.get_total_flops()
    assert node.flops() == matmul_flops + elementwise(node.in_shapes, node.out_shape)


def test_dropout_in_train_mode_zeroes_and_rescales():
    graph, module = build(["{name: t, op: dropout, p: 0.25}"], (4000,))
    x = torch.rand(2, 4000, dtype=torch.float64) + 1
    y = module.train()(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert 0.2 < 1 - kept.double().mean().item() < 0.3
    assert torch.equal(module.eval()(x), x)


def test_batchnorm_eval_uses_running_statistics():
    graph, module = build(["{name: t, op: batchnorm, momentum: 0.5}"], (3,))
    x = torch.randn(8, 3, dtype=torch.float64)
    module.train()(x)
    bn = module.get_submodule("t")
    torch.testing.assert_close(bn.running_mean, 0.5 * x.mean(0))
    y = module.eval()(x)
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5) * bn.weight + bn.bias
    torch.testing.assert_close(y, expected.detach())


def test_identity_returns_a_copy():
    _, module = build(["{name: t, op: identity}"], (3,))
    x = torch.randn(2, 3, dtype=torch.float64)
    y = module(x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


# -- argument validation --------------------------------------------------------------------
REQUIRED = {"linear": {"out": 2}, "conv2d": {"out": 2}, "scale": {"factor": 2}, "attention": {"heads": 2},
            "parameter": {"shape": "[2]"}, "reshape": {"shape": "[2]"}, "permute": {"dims": "[0, 1]"},
            "mean": {"dims": "[1]"}, "transpose": {"dim0": 1, "dim1": 1}, "select": {"dim": 1, "index": 0},
            "narrow": {"dim": 1, "start": 0, "length": 1}, "embedding": {"tokens": 5, "dim": 2},
            "equal": {"value": 0}}
LIST_ARGS = {("parameter", "shape"), ("reshape", "shape"), ("permute", "dims"), ("mean", "dims")}
BUILTIN_ARGS = sorted((name, arg.name) for name, op in registered_ops().items()
                      if type(op).__module__.startswith("graphgrow.ops") for arg in op.args)


@pytest.mark.parametrize("bad", ["zzz", "[1]", "{a: 1}", ".nan"])
@pytest.mark.parametrize("op_name,arg_name", BUILTIN_ARGS, ids=[f"{o}.{a}" for o, a in BUILTIN_ARGS])
def test_wrong_argument_value_names_argument_and_location(op_name, arg_name, bad):
    fields = "".join(f"{k}: {v}, " for k, v in REQUIRED.get(op_name, {}).items() if k != arg_name)
    if bad == "[1]" and (op_name, arg_name) in LIST_ARGS:
        bad = "[zzz]"  # a list of one integer is a valid value there
    layer = f"{{name: t, op: {op_name}, {fields}{arg_name}: {bad}}}"
    text = f"graphgrow: 1\nname: n\ninput: {{shape: [2]}}\nlayers:\n  - {layer}\n"
    with pytest.raises(GraphgrowError) as info:
        graph_from_text(text, "ops.yaml")
    err = info.value
    assert type(err) is GraphgrowError
    assert err.message.startswith(f"argument '{arg_name}' of op '{op_name}'"), err.message
    assert (err.file, err.line, err.node) == ("ops.yaml", 5, "t")
    assert err.column == 5 + layer.index(f" {arg_name}: ") + len(arg_name) + 3


@pytest.mark.parametrize("layer,message", [
    ("{name: t, op: dropout, p: 1}", "expected a probability in [0, 1), got 1.0"),
    ("{name: t, op: dropout, p: -0.1}", "expected a probability in [0, 1)"),
    ("{name: t, op: conv2d, out: 2, padding: -1}", "expected a non-negative integer"),
    ("{name: t, op: conv2d, out: 2, padding: valid}", "expected one of 'same', got 'valid'"),
    ("{name: t, op: residual, activation: scale}", "'scale' is not an activation"),
    ("{name: t, op: residual, activation: tahn}", "unknown op 'tahn'"),
    ("{name: t, op: residual, form: three_weight}", "expected one of 'two_weight', 'one_weight'"),
    ("{name: t, op: maxpool2d, stride: 0}", "expected a positive integer, got 0"),
    ("{name: t, op: leaky_relu, slope: .inf}", "expected a finite number, got inf"),
    ("{name: t, op: linear, out: 2, bias: 'yes'}", "expected true or false, got 'yes'"),
    ("{name: t, op: concat, dim: 1.0, inputs: [input, input]}", "expected an integer, got 1.0"),
])
def test_argument_value_checks(layer, message):
    text = f"graphgrow: 1\nname: n\ninput: {{shape: [1, 4, 4]}}\nlayers:\n  - {layer}\n"
    with pytest.raises(GraphgrowError) as info:
        graph_from_text(text)
    assert message in info.value.message and info.value.node == "t"


@pytest.mark.parametrize("layer,shape,message", [
    ("{name: t, op: conv2d, out: 2, kernel: 5, padding: 0}", [1, 4, 4], "conv2d kernel 5 does not fit input [1, 4, 4]"),
    ("{name: t, op: conv2d, out: 2, kernel: 2}", [1, 4, 4], "padding 'same' needs an odd kernel"),
    ("{name: t, op: maxpool2d, kernel: 5}", [1, 4, 4], "maxpool2d kernel 5 is larger than its input [1, 4, 4]"),
    ("{name: t, op: avgpool2d}", [4], "avgpool2d needs input of shape (channels, height, width)"),
    ("{name: t, op: batchnorm}", [1, 2, 2, 2], "batchnorm needs (C,), (C, L) or (C, H, W) input"),
    ("{name: t, op: residual, branch: conv2d}", [4], "residual with branch conv2d needs input of shape"),
    ("{name: t, op: concat, inputs: [input, input], dim: 3}", [4], "concat dim 3 is out of range"),
    ("{name: a, op: flatten}\n  - {name: t, op: concat, inputs: [a, input]}", [1, 2, 2],
     "concat along dim 1 needs matching other dimensions, got [4] and [1, 2, 2]"),
])
def test_shape_rule_errors(layer, shape, message):
    text = f"graphgrow: 1\nname: n\ninput: {{shape: {shape}}}\nlayers:\n  - {layer}\n"
    with pytest.raises(GraphgrowError) as info:
        graph_from_text(text, "s.yaml")
    err = info.value
    assert message in err.message and err.node == "t" and err.file == "s.yaml" and err.line is not None


NEW_OPS_NETWORK = """graphgrow: 1
name: new_ops
input: {shape: [2, 8, 8]}
layers:
  - {name: c, op: conv2d, out: 4, groups: 2}
  - {name: mp, op: maxpool2d, kernel: 3, stride: 2, padding: 1}
  - {name: mc, op: maxpool2d, kernel: 3, stride: 2, ceil_mode: true, inputs: c}
  - {name: ap, op: avgpool2d, kernel: 3, stride: 2, padding: 1, inputs: c}
  - {name: s, op: add, inputs: [mp, mc, ap]}
  - {name: a1, op: silu}
  - {name: a2, op: hardswish}
  - {name: a3, op: relu6}
  - {name: g, op: mean, dims: [2, 3], keepdim: true}
  - {name: gate, op: hardsigmoid}
  - {name: m, op: multiply, inputs: [a3, gate]}
  - {name: sd, op: stochastic_depth, p: 0.2}
  - {name: p, op: permute, dims: [0, 2, 3, 1]}
  - {name: r, op: reshape, shape: [16, -1]}
  - {name: ln, op: layernorm, dims: 1}
  - {name: q, op: narrow, dim: 2, start: 0, length: 2}
  - {name: k, op: narrow, dim: -1, start: 2, length: 2, inputs: ln}
  - {name: att, op: scaled_dot_product_attention, inputs: [q, k, k]}
  - {name: tokens, op: transpose, dim0: 1, dim1: 2}
  - {name: wide, op: flatten, start: 2, inputs: [tokens]}
  - {name: one, op: concat, inputs: [wide]}
  - {name: cls, op: parameter, shape: [1, 16]}
  - {name: clss, op: expand_batch, inputs: [cls, input]}
  - {name: joined, op: concat, inputs: [clss, one]}
  - {name: mha, op: attention, heads: 2}
  - {name: first, op: select, dim: 1, index: 0}
  - {name: t, op: linear, out: 3}
"""


def test_the_new_ops_export_in_both_formats(tmp_path):
    """Every op added for the model families, in one network: torch.export and TorchScript
    artifacts compute what the compiled module computes (eval mode)."""
    from graphgrow.compiler.export import export, load_exported
    graph = graph_from_text(NEW_OPS_NETWORK)
    module = compile_graph(graph, seed=2, dtype=torch.float64).eval()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(x)
        for fmt, suffix in (("export", "pt2"), ("torchscript", "pt")):
            loaded = load_exported(export(module, graph, tmp_path / f"new_ops.{suffix}", fmt))
            torch.testing.assert_close(loaded(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("train", [False, True])
def test_head_attention_reads_masks_as_multihead_attention(train):
    """Grown attention (HeadAttention, what widening heads compiles to) with heads x head_dim = D
    computes nn.MultiheadAttention's function with the same weights, also with the causal mask
    and a key padding mask (the masks a spec gives it), in float64."""
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(6, 3, batch_first=True, dtype=torch.float64).train(train)
    grown = HeadAttention(6, 3, 2, bias=True, dropout=0.0).double().train(train)
    grown.load_state_dict(reference.state_dict())
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    padding = torch.tensor([[False] * 4 + [True], [False] * 5])
    for kwargs in ({}, {"attn_mask": causal, "is_causal": True}, {"key_padding_mask": padding},
                   {"attn_mask": causal, "key_padding_mask": padding}):
        expected = reference(x, x, x, need_weights=False, **kwargs)[0]
        torch.testing.assert_close(grown(x, x, x, need_weights=False, **kwargs)[0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 4, 3, 3), (6, 3, 5, 5), (3, 6, 1, 1), (2, 2, 3, 1)])
def test_dirac_kernel_is_torchs(shape):
    """graphgrow.init.dirac_ (one strided write) equals torch.nn.init.dirac_ (entry by entry)."""
    assert torch.equal(dirac_(torch.randn(shape)), nn.init.dirac_(torch.empty(shape)))
