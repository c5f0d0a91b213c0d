"""Token models: embeddings and attention masks import, compute the same function (float64,
train and eval), round-trip through YAML and export; masks become a causal flag or a mask
input, never code in the spec."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from graphgrow import GraphgrowError
from graphgrow.compiler.export import export, load_exported
from graphgrow.compiler.importer import import_module
from graphgrow.compiler.io import dump, reload_graph
from graphgrow.compiler.network import Network
from graphgrow.ir import graph_from_text
from zoo import NanoGPT

VOCABULARY, TOKENS, WIDTH = 11, 6, 8


def causal_bool(true_attends: bool) -> torch.Tensor:
    later = torch.ones(TOKENS, TOKENS, dtype=torch.bool).triu(1)
    return ~later if true_attends else later


class MaskedAttention(nn.Module):
    """Embedding, then nn.MultiheadAttention with the mask given as ``how``, and a head."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embed = nn.Embedding(VOCABULARY, WIDTH, padding_idx=0)
        self.attn = nn.MultiheadAttention(WIDTH, 2, dropout=0.2, batch_first=True)
        self.register_buffer("bool_mask", causal_bool(true_attends=False))
        self.register_buffer("float_mask", torch.zeros(TOKENS, TOKENS).masked_fill(causal_bool(False), float("-inf")))
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.how == "bool_buffer":
            y = self.attn(x, x, x, attn_mask=self.bool_mask, need_weights=False)[0]
        elif self.how == "float_buffer_is_causal":
            y = self.attn(x, x, x, attn_mask=self.float_mask, is_causal=True, need_weights=False)[0]
        elif self.how == "key_padding":
            y = self.attn(x, x, x, key_padding_mask=tokens == 0, need_weights=False)[0]
        else:  # causal and key padding together
            y = self.attn(x, x, x, key_padding_mask=tokens == 0, attn_mask=self.bool_mask, need_weights=False)[0]
        return self.head(x + y)


class FunctionalAttention(nn.Module):
    """F.embedding with the module's table, heads by view/transpose and
    F.scaled_dot_product_attention with the mask given as ``how``."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.table = nn.Parameter(torch.randn(VOCABULARY, WIDTH))
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.bias = nn.Linear(WIDTH, 1)
        self.register_buffer("mask", causal_bool(true_attends=True))

    def forward(self, tokens):
        x = F.embedding(tokens, self.table)
        n, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(n, t, 2, WIDTH // 2).transpose(1, 2) for z in (q, k, v))
        if self.how == "is_causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.how == "buffer_by_position":
            y = F.scaled_dot_product_attention(q, k, v, self.mask)
        else:  # a float mask on the keys computed from the input, by position before other arguments
            keys = self.bias(x).transpose(1, 2).unsqueeze(1)  # (n, 1, 1, t)
            y = F.scaled_dot_product_attention(q, k, v, keys, 0.0, False)
        return y.transpose(1, 2).reshape(n, t, WIDTH)


def tokens_batch(batch=4, seed=1):
    tokens = torch.randint(1, VOCABULARY, (batch, TOKENS), generator=torch.Generator().manual_seed(seed))
    tokens[:, -2:] = 0  # padding at the end: every query keeps a key
    return tokens


def _run(module, x, train, seed=5):
    module.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        return module(x)


# the other forms compile to the same graph as one of these (a causal flag), so these export
EXPORTED = {"both", "is_causal", "computed"}
MODELS = [(MaskedAttention, how) for how in ("bool_buffer", "float_buffer_is_causal", "key_padding", "both")] + \
         [(FunctionalAttention, how) for how in ("is_causal", "buffer_by_position", "computed")]


@pytest.mark.parametrize("make,how", MODELS, ids=[how for _, how in MODELS])
def test_masked_attention_imports_exactly_and_exports(make, how, tmp_path):
    torch.manual_seed(0)
    model = make(how).double()
    network = import_module(model, (TOKENS,), tokens=VOCABULARY)
    x = tokens_batch()
    for train in (False, True):
        expected, got = _run(model, x, train), _run(network.module, x, train)
        assert ((got - expected).norm() / expected.norm()).item() <= 1e-6, (how, train)
    text = dump(network.graph)
    assert "tokens: 11" in text and "mask" not in text.replace("key_padding", "")
    ops = {node.op: node.args for node in network.graph.nodes}
    attention = ops.get("attention", ops.get("scaled_dot_product_attention"))
    assert attention["causal"] == (how not in ("key_padding", "computed"))
    reloaded = Network.build(reload_graph(network.graph), network.state(), dtype=torch.float64)
    expected = _run(network.module, x, False)
    assert torch.equal(_run(reloaded.module, x, False), expected)
    for fmt, suffix in (("export", "pt2"), ("torchscript", "pt")) if how in EXPORTED else ():
        loaded = load_exported(export(network.module, network.graph, tmp_path / f"m.{suffix}", fmt))
        torch.testing.assert_close(loaded(x), expected, rtol=1e-12, atol=1e-12)


def test_key_padding_becomes_an_input_of_attention():
    network = import_module(MaskedAttention("both").double(), (TOKENS,), tokens=VOCABULARY)
    attention = next(n for n in network.graph.nodes if n.op == "attention")
    mask = network.graph.node(attention.inputs[1])
    assert (mask.op, mask.args, mask.inputs) == ("equal", {"value": 0.0}, ["input"])


def test_token_ids_held_as_floats_give_the_same_output():
    """The training runtime casts data to the network's dtype: float ids look up the same rows."""
    torch.manual_seed(0)
    network = import_module(MaskedAttention("key_padding").double(), (TOKENS,), tokens=VOCABULARY)
    x = tokens_batch()
    assert torch.equal(_run(network.module, x.double(), False), _run(network.module, x, False))


def test_the_padding_row_gets_no_gradient():
    torch.manual_seed(0)
    network = import_module(MaskedAttention("bool_buffer").double(), (TOKENS,), tokens=VOCABULARY)
    network.module.train()
    network.module(tokens_batch()).sum().backward()
    grad = dict(network.module.named_parameters())["embed.weight"].grad
    assert not grad[0].any() and grad[1:].abs().sum() > 0


class ConstantMask(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.embed = nn.Embedding(VOCABULARY, WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.register_buffer("mask", torch.eye(TOKENS, dtype=torch.bool))

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.functional:
            return F.scaled_dot_product_attention(x, x, x, attn_mask=self.mask)
        return self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0]


@pytest.mark.parametrize("functional", [False, True])
def test_a_constant_mask_other_than_the_causal_one_is_refused(functional):
    with pytest.raises(GraphgrowError, match="constant attention mask that is not the causal mask") as info:
        import_module(ConstantMask(functional), (TOKENS,), tokens=VOCABULARY)
    assert info.value.line is not None and "test_import_tokens.py" in info.value.file


def test_embedding_settings_graphgrow_cannot_express_are_refused():
    model = nn.Sequential(nn.Embedding(VOCABULARY, WIDTH, max_norm=1.0))
    with pytest.raises(GraphgrowError, match="max_norm"):
        import_module(model, (TOKENS,), tokens=VOCABULARY)


def test_a_token_spec_compiles_and_round_trips():
    text = ("graphgrow: 1\nname: lm\ninput: {shape: [5], tokens: 9}\nlayers:\n"
            "  - {name: e, op: embedding, tokens: 9, dim: 4}\n"
            "  - {name: a, op: attention, heads: 2, causal: true}\n"
            "  - {name: t, op: linear, out: 9}\n")
    graph = graph_from_text(text)
    assert graph.input_tokens == 9 and graph.node("t").out_shape == (5, 9)
    assert graph_from_text(dump(graph)).summary() == graph.summary()
    module = Network.build(graph, seed=0, dtype=torch.float64).module.eval()
    ids = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 9
    with torch.no_grad():  # causal: changing the last token leaves every earlier output as it was
        before, after = module(ids), module(changed)
    assert torch.equal(before[:, :-1], after[:, :-1]) and not torch.equal(before[:, -1], after[:, -1])


@pytest.mark.parametrize("value,message", [(0, "positive integer"), ("many", "positive integer"),
                                           (2.5, "positive integer")])
def test_bad_input_tokens_are_located_errors(value, message):
    text = f"graphgrow: 1\nname: lm\ninput: {{shape: [5], tokens: {value}}}\nlayers:\n  - {{name: t, op: identity}}\n"
    with pytest.raises(GraphgrowError, match=message) as info:
        graph_from_text(text, "lm.yaml")
    assert (info.value.file, info.value.line) == ("lm.yaml", 3)


def test_embedding_padding_must_be_a_row():
    text = ("graphgrow: 1\nname: lm\ninput: {shape: [5], tokens: 9}\nlayers:\n"
            "  - {name: e, op: embedding, tokens: 9, dim: 4, padding: 9}\n")
    with pytest.raises(GraphgrowError, match="padding id 9 is not below tokens 9") as info:
        graph_from_text(text)
    assert info.value.node == "e"


def test_training_data_must_hold_token_ids():
    from graphgrow.runtime.splits import Split, check_data_fits
    graph = graph_from_text("graphgrow: 1\nname: lm\ninput: {shape: [3], tokens: 5}\nlayers:\n"
                            "  - {name: e, op: embedding, tokens: 5, dim: 2}\n", "lm.yaml")
    network = Network.build(graph, seed=0)
    labels = torch.zeros(2, dtype=torch.long)
    check_data_fits(network, Split(torch.tensor([[0.0, 4.0, 2.0], [1.0, 1.0, 3.0]]), labels))
    for bad in ([[0, 5, 2], [1, 1, 3]], [[0.0, 4.0, 2.0], [1.0, 1.5, 3.0]], [[0, 1, 2], [-1, 1, 3]]):
        with pytest.raises(GraphgrowError, match="not token ids below 5") as info:
            check_data_fits(network, Split(torch.tensor(bad), labels))
        assert info.value.option == "data" and info.value.file == "lm.yaml"


def test_embedding_initialisation_is_seeded_normal_with_a_zero_padding_row():
    graph = graph_from_text("graphgrow: 1\nname: lm\ninput: {shape: [3], tokens: 400}\nlayers:\n"
                            "  - {name: e, op: embedding, tokens: 400, dim: 50, padding: 7}\n")
    first, again = (Network.build(graph, seed=4).state()["e.weight"] for _ in range(2))
    assert torch.equal(first, again) and not first[7].any()
    rows = torch.cat([first[:7], first[8:]])
    assert abs(rows.mean().item()) < 0.02 and abs(rows.std().item() - 1) < 0.02  # 19,950 draws of N(0, 1)
    assert not torch.equal(first, Network.build(graph, seed=5).state()["e.weight"])


class ConstantPadding(ConstantMask):
    """A key padding buffer of one fixed batch size (2, the importer's probe batch)."""

    def __init__(self):
        super().__init__(False)
        self.register_buffer("padding", torch.zeros(2, TOKENS, dtype=torch.bool))

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.attn(x, x, x, key_padding_mask=self.padding, need_weights=False)[0]


def test_a_constant_key_padding_mask_is_refused():
    with pytest.raises(GraphgrowError, match="constant key_padding_mask"):
        import_module(ConstantPadding(), (TOKENS,), tokens=VOCABULARY)


def nano_gpt(tied=False):
    """The zoo's nanoGPT at this file's sizes; its position table has two rows more than the input."""
    return NanoGPT(vocabulary=VOCABULARY, block_size=TOKENS + 2, dim=WIDTH, heads=2, layers=2, tied=tied)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_position_ids_from_arange_import_as_positions_and_export(dtype, tmp_path):
    torch.manual_seed(0)
    model = nano_gpt().to(dtype)
    network = import_module(model, (TOKENS,), tokens=VOCABULARY)
    positions = [n for n in network.graph.nodes if n.op == "positions"]
    assert len(positions) == 1 and positions[0].inputs == ["input"]
    reader = network.graph.node(network.graph.consumers(positions[0].name)[0])
    assert reader.op == "embedding" and reader.args["tokens"] == TOKENS + 2  # the whole table is kept
    assert torch.equal(network.state()[f"{reader.name}.weight"], model.wpe.weight.detach())
    x = tokens_batch()
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    expected = _run(model, x, False)
    torch.testing.assert_close(_run(network.module, x, False), expected, rtol=tolerance, atol=tolerance)
    reloaded = Network.build(reload_graph(network.graph), network.state(), dtype=dtype)
    assert torch.equal(_run(reloaded.module, x, False), _run(network.module, x, False))
    for fmt, suffix in (("export", "pt2"), ("torchscript", "pt")):
        loaded = load_exported(export(network.module, network.graph, tmp_path / f"m.{suffix}", fmt))
        torch.testing.assert_close(loaded(x), expected, rtol=tolerance, atol=tolerance)


def test_positions_give_every_sample_rows_0_to_t_of_the_table():
    """Against an independent computation: token rows plus position rows 0..T-1, the position
    rows the same for every sample; their gradient sums over the batch."""
    text = ("graphgrow: 1\nname: lm\ninput: {shape: [5], tokens: 9}\nlayers:\n"
            "  - {name: tok, op: embedding, tokens: 9, dim: 4}\n"
            "  - {name: pos, op: positions, inputs: [input]}\n"
            "  - {name: table, op: embedding, tokens: 7, dim: 4}\n"
            "  - {name: t, op: add, inputs: [tok, table]}\n")
    graph = graph_from_text(text)
    assert graph.node("pos").out_shape == (5,) and graph.node("t").out_shape == (5, 4)
    network = Network.build(graph, seed=0, dtype=torch.float64)
    ids = torch.randint(0, 9, (3, 5), generator=torch.Generator().manual_seed(0))
    tokens, table = network.state()["tok.weight"], network.state()["table.weight"]
    expected = torch.stack([torch.stack([tokens[ids[b, i]] + table[i] for i in range(5)]) for b in range(3)])
    out = network.module(ids)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    gradient = network.module.table.weight.grad
    assert torch.equal(gradient[:5], torch.full((5, 4), 3.0, dtype=torch.float64)) and not gradient[5:].any()


def test_positions_need_a_token_axis():
    text = ("graphgrow: 1\nname: lm\ninput: {shape: [5], tokens: 9}\nlayers:\n"
            "  - {name: first, op: select, dim: 1, index: 0}\n"
            "  - {name: pos, op: positions}\n")
    with pytest.raises(GraphgrowError, match="positions needs an input with a token axis") as info:
        graph_from_text(text, "lm.yaml")
    assert (info.value.file, info.value.line, info.value.node) == ("lm.yaml", 6, "pos")


class OtherPositions(NanoGPT):
    def __init__(self, how):
        super().__init__(vocabulary=VOCABULARY, block_size=TOKENS + 2, dim=WIDTH)
        self.how = how

    def forward(self, idx):
        if self.how == "offset":
            pos = torch.arange(1, idx.size(1) + 1)
        elif self.how == "block":  # the whole table, then the first T rows
            return self.lm_head(self.wte(idx) + self.wpe(torch.arange(idx.size(1) + 2))[:TOKENS])
        elif self.how == "float_bounds":
            pos = torch.arange(0.0, idx.size(1))
        elif self.how == "constant":  # fx evaluates an arange of constants while tracing
            return self.lm_head(self.wte(idx) + self.wpe(torch.arange(TOKENS)))
        else:
            pos = torch.arange(idx.size(1), dtype=torch.float32)
        return self.lm_head(self.wte(idx) + self.wpe(pos.long()))


@pytest.mark.parametrize("how,message", [("offset", r"gives \[1, 2, 3, 4, \.\.\.\] \(6 of them\)"),
                                         ("block", r"gives \[0, 1, 2, 3, \.\.\.\] \(8 of them\)"),
                                         ("float", "positions of dtype torch.float32"),
                                         ("float_bounds", "positions of dtype torch.float32"),
                                         ("constant", r"shape \[6, 8\] from constants only")])
def test_other_aranges_are_refused_at_their_line(how, message):
    with pytest.raises(GraphgrowError, match=message) as info:
        import_module(OtherPositions(how), (TOKENS,), tokens=VOCABULARY)
    err = info.value
    assert "test_import_tokens.py" in err.file and err.line is not None
    assert "torch.arange(x.size(1))" in err.hint


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


class SharedFunctionalTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCABULARY, WIDTH))

    def forward(self, tokens):
        return F.linear(F.embedding(tokens, self.table), self.table)


@pytest.mark.parametrize("make,shape,tokens,names", [
    (lambda: nano_gpt(tied=True), (TOKENS,), VOCABULARY, ("'wte.weight'", "'wte' and 'lm_head'")),
    (CalledTwice, (3,), None, ("'fc.weight'", "'fc' and 'fc_1'")),
    (SharedFunctionalTable, (TOKENS,), VOCABULARY, ("'table'", "'embedding' and 'linear'")),
])
def test_shared_weights_are_refused_rather_than_untied(make, shape, tokens, names):
    """A tensor in two layers (tied output layer, a module called twice, one table in two
    functional calls) would become two tensors that train apart: refused, with a hint."""
    with pytest.raises(GraphgrowError, match="shared or tied weights") as info:
        import_module(make(), shape, tokens=tokens)
    err = info.value
    assert all(name in err.message for name in names), err.message
    assert "give each layer its own" in err.hint
