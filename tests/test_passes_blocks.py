"""Residual blocks as units: recognised in imported model families and shipped specs, and
inserted as copies with their last layer zero at every block boundary, function preserved in
float64 (1e-10) with a non-zero gradient on the zeroed layer."""
from __future__ import annotations

import pytest
import torch

from graphgrow import GraphgrowError, Network, load_graph
from graphgrow.compiler.importer import import_module
from passes.blocks import block_boundaries, find_blocks, insert_block

from conftest import SPECS_DIR
from zoo import FAMILIES, CNBlock, EncoderBlock, InvertedResidual, MBConv

# the families with residual blocks; train mode is compared where no block draws random numbers
# (a copied block's dropout draws some, which shifts the later random stream)
BLOCK_FAMILIES = {"resnet_basic": True, "resnet_bottleneck": True, "mobilenet_v2": True, "efficientnet": False,
                  "convnext": False, "vit": False}


def _residual_modules(model) -> int:
    """Blocks of the model counted from its definition: a ResNet block each, an inverted residual
    with its shortcut, a ConvNeXt block, two per transformer encoder block (attention, MLP)."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in ("BasicBlock", "Bottleneck") or isinstance(module, CNBlock):
            count += 1
        elif isinstance(module, (InvertedResidual, MBConv)):
            count += module.use_res_connect
        elif isinstance(module, EncoderBlock):
            count += 2
    return count


@pytest.fixture(scope="module", params=sorted(BLOCK_FAMILIES))
def family(request):
    make, shape = FAMILIES[request.param]
    torch.manual_seed(0)
    model = make().double()
    return request.param, model, import_module(model, shape), shape


def _outputs(network, x, train):
    network.module.train(train)
    torch.manual_seed(3)
    return network.module(x)


def test_blocks_are_recognised_on_import(family):
    name, model, network, _ = family
    blocks = find_blocks(network.graph)
    assert len(blocks) == _residual_modules(model) > 0
    for block in blocks:  # branch and shortcut start at the entry and meet at the add
        add = network.graph.node(block.add)
        assert block.branch[-1] in add.inputs and set(block.branch).isdisjoint(block.shortcut)


def test_a_block_copy_at_every_boundary_preserves_the_function(family):
    name, model, network, shape = family
    x = torch.randn(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    blocks = find_blocks(network.graph)
    boundaries = block_boundaries(network.graph)
    assert set(b.output for b in blocks) <= set(boundaries)
    modes = (False, True) if BLOCK_FAMILIES[name] else (False,)
    for after in boundaries:
        template = next(b for b in blocks if after == b.output or after == b.entry and not b.shortcut)
        grown, record = insert_block(network, template.output, after=after)
        assert len(grown.graph) == len(network.graph) + len(template.branch) + 1 + (template.output != template.add)
        for train in modes:
            expected, got = _outputs(network, x, train), _outputs(grown, x, train)
            assert ((got - expected).norm() / expected.norm()).item() <= 1e-10, (after, train)
        zeroed = [n for n, origin in record.origins.items() if origin.kind == "new" and origin.init == "zeros"]
        assert zeroed and all(not grown.state()[n].any() for n in zeroed)


def test_the_zeroed_layer_has_a_gradient(family):
    name, model, network, shape = family
    last = find_blocks(network.graph)[-1]
    grown, record = insert_block(network, last.output)
    zeroed = [n for n, origin in record.origins.items() if origin.init == "zeros" and n.endswith("weight")]
    x = torch.randn(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grown.module.train()
    grown.module(x).square().sum().backward()
    parameters = dict(grown.module.named_parameters())
    assert zeroed and all(parameters[n].grad.abs().sum() > 0 for n in zeroed)


def test_the_shipped_resnet_has_its_blocks_and_boundaries():
    network = Network.build(load_graph(SPECS_DIR / "resnet_small.yaml"), seed=0, dtype=torch.float64)
    blocks = find_blocks(network.graph)
    assert [b.output for b in blocks] == ["s1_1", "s1_2", "s2_1", "s2_2", "s3_1", "s3_2"]
    assert [len(b.shortcut) for b in blocks] == [0, 0, 2, 0, 2, 0]
    assert block_boundaries(network.graph) == ["s1_0", "s1_1", "s1_2", "s2_1", "s2_2", "s3_1", "s3_2"]


def test_a_relu_block_is_refused_where_its_input_is_not_a_relu_output():
    torch.manual_seed(0)
    network = import_module(FAMILIES["resnet_basic"][0]().double(), (3, 32, 32))
    block = find_blocks(network.graph)[0]
    with pytest.raises(GraphgrowError, match="needs x to come out of relu"):
        insert_block(network, block.output, after=block.branch[0])
    with pytest.raises(GraphgrowError, match="not the add or the output of a residual block"):
        insert_block(network, block.branch[0])


def test_insert_block_runs_as_a_pipeline_step():
    from passes import Pipeline
    network = Network.build(load_graph(SPECS_DIR / "resnet_small.yaml"), seed=0, dtype=torch.float64)
    grown, records = Pipeline.parse("insert-block{block=s2_2}").run(network)
    assert len(grown.graph) == len(network.graph) + 7


@pytest.mark.parametrize("restriction", ["half-transpose", "injection"])
def test_depth_hierarchy_on_an_imported_resnet(restriction):
    from passes import build_hierarchy
    from passes.hierarchy import block_stages
    torch.manual_seed(0)
    network = import_module(FAMILIES["resnet_basic"][0]().double(), (3, 32, 32))
    stages = [[group[-1].output for group in stage] for stage in block_stages(network.graph) if len(stage) > 1]
    assert stages == [["layer1_0_relu_1", "layer1_1_relu_1"]]
    fine, coarse = build_hierarchy(network, "depth", levels=2, restriction=restriction)
    transfer = coarse.transfer
    assert len(coarse.network.graph) == len(network.graph) - 7
    fine_state = network.state()
    coarse_state = transfer.coarse.state()
    # the kept block's branch is doubled through its last layer (bn2): 2 R of the fine pair
    pair = [fine_state[f"layer1_{k}_bn2.weight"] for k in (0, 1)]
    doubled = pair[0] + pair[1] if restriction == "half-transpose" else 2 * pair[0]
    torch.testing.assert_close(coarse_state["layer1_0_bn2.weight"], doubled, rtol=0, atol=1e-15)
    torch.testing.assert_close(coarse_state["layer1_0_conv1.weight"], fine_state["layer1_0_conv1.weight"] if
                               restriction == "injection" else (fine_state["layer1_0_conv1.weight"]
                                                                + fine_state["layer1_1_conv1.weight"]) / 2)
    # R P = I: prolonging the coarse parameters and restricting them back changes nothing
    again = transfer.restrict(transfer.prolong(dict(coarse_state)))
    assert set(again) == set(coarse_state)
    assert all(torch.equal(again[k], coarse_state[k]) for k in coarse_state)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    rebuilt = Network.build(coarse.network.graph, again, dtype=torch.float64)
    coarse.network.module.eval(), rebuilt.module.eval()
    assert torch.equal(rebuilt.module(x), coarse.network.module(x))


def test_the_shipped_resnet_coarsens_its_first_stage():
    from passes import build_hierarchy
    network = Network.build(load_graph(SPECS_DIR / "resnet_small.yaml"), seed=0, dtype=torch.float64)
    levels = build_hierarchy(network, "depth", levels=2)
    coarse = [b.output for b in find_blocks(levels[1].network.graph)]
    assert coarse == ["s1_1", "s2_1", "s2_2", "s3_1", "s3_2"]
