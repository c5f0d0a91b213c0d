"""Every imported model family (tests/zoo.py) takes identity insertion, and every family with
stages of equal residual blocks a depth hierarchy, with the function preserved in float64
(1e-10): the issue's list for the zoo. Block insertion at every boundary of the vision families
is in tests/test_passes_blocks.py; the token transformer's is here."""
from __future__ import annotations

import copy

import pytest
import torch

import passes
from graphgrow.compiler.importer import import_module
from graphgrow.compiler.network import Network
from passes.blocks import block_boundaries, find_blocks, insert_block
from passes.hierarchy import block_stages

from zoo import FAMILIES, TOKENS, Bottleneck, ConvNeXt, EfficientNet, MobileNetV2, ResNet, family_input

# families without an idempotent activation (silu, gelu) have no position for a linear/conv +
# activation identity; a residual identity block (W2 = 0) goes after their first block instead.
# Transformer tokens (N, D) take neither form: they grow by block copies (insert_block).
RESIDUAL_FORM = {"efficientnet", "convnext"}
BLOCK_FORM = {"vit", "token_transformer", "nanogpt"}


def _imported(name, make=None):
    make = make or FAMILIES[name][0]
    torch.manual_seed(0)
    return import_module(make().double(), FAMILIES[name][1], tokens=TOKENS.get(name))


def _relative(got, expected) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def _outputs(network, x, train):
    """The output on a copy of the module: train mode leaves the network's batch-norm statistics
    as they were."""
    module = copy.deepcopy(network.module).train(train)
    torch.manual_seed(3)  # dropout draws the same numbers in both
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_identity_insertion_preserves_every_family(name):
    network = _imported(name)
    x = family_input(name, 2)
    if name in BLOCK_FORM:
        grown = [insert_block(network, block.output)[0] for block in find_blocks(network.graph)]
    elif name in RESIDUAL_FORM:
        grown = [passes.insert_identity(network, find_blocks(network.graph)[0].output, form="residual")[0]]
    else:
        positions = passes.legal_positions(network.graph)
        assert positions, name
        grown = [passes.insert_identity(network, after)[0] for after in {positions[0], positions[-1]}]
    # a copied transformer block's dropout draws random numbers, which shifts the later random
    # stream; the other insertions draw none, so train mode is compared too
    modes = (False,) if name in BLOCK_FORM else (False, True)
    for deeper in grown:
        assert len(deeper.graph) > len(network.graph)
        for train in modes:
            assert _relative(_outputs(deeper, x, train), _outputs(network, x, train)) <= 1e-10, (name, train)


def test_the_token_transformer_grows_by_blocks_at_every_boundary():
    network = _imported("token_transformer")
    blocks = find_blocks(network.graph)
    assert [len(b.branch) for b in blocks] == [2, 5, 15, 5]  # MHA, MLP, hand-written attention, MLP
    x = family_input("token_transformer", 2)
    for after in block_boundaries(network.graph):
        template = next(b for b in blocks if after in (b.output, b.entry))
        grown, _ = insert_block(network, template.output, after=after)
        assert _relative(_outputs(grown, x, False), _outputs(network, x, False)) <= 1e-10, after


# The zoo's defaults have at most one block with an identity shortcut per stage (the first block
# of a stage projects); these variants of the same definitions have two or more. ConvNeXt and
# EfficientNet raise their stochastic-depth rate block by block (their defaults here): a train-only
# argument, so blocks that differ only in it are equal for passes.hierarchy.
HIERARCHY_VARIANTS = {
    "resnet_basic": (FAMILIES["resnet_basic"][0], [2]),
    "resnet_bottleneck": (lambda: ResNet(Bottleneck, (3, 1, 1, 1), widths=(4, 8, 8, 8)), [2]),
    "mobilenet_v2": (lambda: MobileNetV2(settings=((1, 8, 1, 1), (6, 8, 3, 2))), [2]),
    "efficientnet": (lambda: EfficientNet(settings=((1, 3, 1, 8, 8, 1), (6, 3, 2, 8, 16, 3), (6, 5, 2, 16, 24, 1))),
                     [2]),
    "convnext": (ConvNeXt, [2, 2]),
}


@pytest.mark.parametrize("name", sorted(HIERARCHY_VARIANTS))
def test_depth_hierarchy_on_every_family_with_stages(name):
    make, stage_sizes = HIERARCHY_VARIANTS[name]
    network = _imported(name, make)
    assert [len(s) for s in block_stages(network.graph) if len(s) > 1] == stage_sizes
    fine, coarse = passes.build_hierarchy(network, "depth", levels=2)
    transfer = coarse.transfer
    blocks = len(find_blocks(network.graph)) - sum(size // 2 for size in stage_sizes)
    assert len(find_blocks(coarse.network.graph)) == blocks
    # R P = I: prolonging the coarse parameters and restricting them back changes nothing, so the
    # coarse network rebuilt from them computes the same function
    coarse_state = transfer.coarse.state()
    again = transfer.restrict(transfer.prolong(dict(coarse_state)))
    assert set(again) == set(coarse_state)
    x = family_input(name, 2)
    rebuilt = Network.build(coarse.network.graph, again, dtype=torch.float64)
    assert _relative(_outputs(rebuilt, x, False), _outputs(coarse.network, x, False)) <= 1e-10
    # the prolonged parameters fill the fine network exactly
    prolonged = transfer.prolong(dict(coarse_state))
    assert set(prolonged) == set(network.state())
    Network.build(network.graph, prolonged, dtype=torch.float64)
    # drop rates are the fine network's own; the coarse network keeps those of the blocks it keeps
    rates = {n.name: n.args["p"] for n in network.graph.nodes if n.op == "stochastic_depth"}
    assert {n.name: n.args["p"] for n in coarse.network.graph.nodes if n.op == "stochastic_depth"}.items() \
        <= rates.items()
    if name in ("efficientnet", "convnext"):
        assert len(set(rates.values())) > 2  # rising block by block


@pytest.mark.parametrize("name", ["vit", "nanogpt"])
def test_imported_transformer_blocks_form_a_stage_and_prolong_exactly(name):
    """An imported ViT's or nanoGPT's blocks (attention + MLP sub-block each) form one stage of
    equal groups; with identity interpolation the prolonged coarse network computes the coarse
    function (float64, eval: the blocks hold dropout)."""
    network = _imported(name)
    assert [len(stage) for stage in block_stages(network.graph) if len(stage) > 1] == [2]
    fine, coarse = passes.build_hierarchy(network, "depth", levels=2, interpolation="identity")
    prolonged = Network.build(network.graph, coarse.transfer.prolong(dict(coarse.transfer.coarse.state())),
                              dtype=torch.float64)
    x = family_input(name, 2)
    assert _relative(_outputs(prolonged, x, False), _outputs(coarse.network, x, False)) <= 1e-10


def test_the_token_transformers_two_different_blocks_form_no_stage():
    """Its two encoder blocks differ (a causal nn.MultiheadAttention and a functional attention),
    so a depth hierarchy is refused with a hint."""
    network = _imported("token_transformer")
    assert all(len(stage) == 1 for stage in block_stages(network.graph))
    with pytest.raises(Exception, match="no stage of two or more equal"):
        passes.build_hierarchy(network, "depth", levels=2)
