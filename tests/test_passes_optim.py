"""Optimizer state carried across passes: SGD momentum, Adam moments and steps, LR schedulers."""
import copy

import torch

import graphgrow
import passes
from graphgrow import Network

SPEC = """
graphgrow: 1
name: small
input: {shape: [3]}
layers:
  - {name: fc1, op: linear, out: 4}
  - {name: act1, op: relu}
  - {name: fc2, op: linear, out: 4}
  - {name: act2, op: relu}
  - {name: head, op: linear, out: 2}
"""


def network() -> Network:
    return Network.build(graphgrow.graph_from_text(SPEC), seed=3, dtype=torch.float64)


def batch(seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(16, 3, dtype=torch.float64, generator=generator),
            torch.randn(16, 2, dtype=torch.float64, generator=generator))


def step(module, optimizer, seed):
    x, y = batch(seed)
    optimizer.zero_grad()
    ((module(x) - y) ** 2).mean().backward()
    optimizer.step()


def trained(optimizer_class, **hyper):
    net = network()
    optimizer = optimizer_class(net.module.parameters(), **hyper)
    for seed in range(3):
        step(net.module, optimizer, seed)
    return net, optimizer


def reference(net, optimizer, optimizer_class, **hyper):
    """A copy of the old network and optimizer that go on without any pass."""
    module = copy.deepcopy(net.module)
    twin = optimizer_class(module.parameters(), **hyper)
    twin.load_state_dict(optimizer.state_dict())
    return module, twin


def state_of(optimizer, module, name, key):
    return optimizer.state[dict(module.named_parameters())[name]][key]


def test_sgd_momentum_is_carried_and_the_next_step_matches_the_old_optimizer():
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    old, optimizer = trained(torch.optim.SGD, **hyper)
    ref_module, ref_optimizer = reference(old, optimizer, torch.optim.SGD, **hyper)
    old_buffers = {n: state_of(optimizer, old.module, n, "momentum_buffer").clone()
                   for n, _ in old.module.named_parameters()}
    new, record = passes.widen(old, "fc1", 2)  # sensli: outgoing 0, so old gradients are unchanged
    same = passes.transfer_optimizer(optimizer, old.module, new.module, record)
    assert same is optimizer and optimizer.param_groups[0]["lr"] == 0.05
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in new.module.parameters()}
    for name in record.by_kind("carried"):
        assert torch.equal(state_of(optimizer, new.module, name, "momentum_buffer"), old_buffers[name])
    grown = state_of(optimizer, new.module, "fc1.weight", "momentum_buffer")
    assert torch.equal(grown[:4], old_buffers["fc1.weight"]) and not grown[4:].any()
    columns = state_of(optimizer, new.module, "fc2.weight", "momentum_buffer")
    assert torch.equal(columns[:, :4], old_buffers["fc2.weight"]) and not columns[:, 4:].any()
    step(new.module, optimizer, seed=10)
    step(ref_module, ref_optimizer, seed=10)
    after, expected = dict(new.module.named_parameters()), dict(ref_module.named_parameters())
    for name in record.by_kind("carried"):
        assert torch.allclose(after[name], expected[name], atol=1e-13)
    assert torch.allclose(after["fc1.weight"][:4], expected["fc1.weight"], atol=1e-13)
    assert torch.allclose(after["fc2.weight"][:, :4], expected["fc2.weight"], atol=1e-13)


def test_adam_moments_follow_a_split_and_new_layers_start_from_zero_state():
    old, optimizer = trained(torch.optim.Adam, lr=1e-2)
    exp_avg = state_of(optimizer, old.module, "fc2.weight", "exp_avg").clone()
    rows = state_of(optimizer, old.module, "fc1.weight", "exp_avg_sq").clone()
    new, record = passes.widen(old, "fc1", 2, method="split", units=[1, 3], alpha=0.25)
    passes.transfer_optimizer(optimizer, old.module, new.module, record)
    split = state_of(optimizer, new.module, "fc2.weight", "exp_avg")
    # the state is split like the outgoing weights: alpha on the original, 1 - alpha on the copy
    assert torch.allclose(split[:, [1, 3]], 0.25 * exp_avg[:, [1, 3]])
    assert torch.allclose(split[:, 4:], 0.75 * exp_avg[:, [1, 3]])
    assert torch.equal(split[:, [0, 2]], exp_avg[:, [0, 2]])
    duplicated = state_of(optimizer, new.module, "fc1.weight", "exp_avg_sq")
    assert torch.equal(duplicated[4:], rows[[1, 3]])
    assert float(state_of(optimizer, new.module, "head.weight", "step")) == 3.0
    inserted, record = passes.insert_identity(new, "act1")
    passes.transfer_optimizer(optimizer, new.module, inserted.module, record)
    fresh = dict(inserted.module.named_parameters())["act1_id.weight"]
    assert fresh in set(optimizer.param_groups[0]["params"]) and not optimizer.state.get(fresh)
    step(inserted.module, optimizer, seed=11)
    assert float(optimizer.state[fresh]["step"]) == 1.0
    assert float(state_of(optimizer, inserted.module, "head.weight", "step")) == 4.0


def test_lr_scheduler_keeps_driving_the_rewired_optimizer():
    old, optimizer = trained(torch.optim.SGD, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    new, record = passes.insert_identity(old, "act2")
    passes.transfer_optimizer(optimizer, old.module, new.module, record)
    step(new.module, optimizer, seed=11)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.05
    weight = dict(new.module.named_parameters())["act2_id.weight"]
    before = weight.detach().clone()
    x, y = batch(12)
    optimizer.zero_grad()
    ((new.module(x) - y) ** 2).mean().backward()
    grad = weight.grad.clone()
    optimizer.step()
    assert grad.abs().sum() > 0
    assert torch.allclose(weight.detach(), before - 0.05 * grad)  # plain SGD at the scheduled rate


def test_param_groups_are_kept_and_new_parameters_join_their_nodes_group():
    net = network()
    named = dict(net.module.named_parameters())
    optimizer = torch.optim.SGD([{"params": [named["fc1.weight"], named["fc1.bias"]], "lr": 0.5},
                                 {"params": [p for n, p in named.items() if not n.startswith("fc1")], "lr": 0.1}])
    new, record = passes.widen(net, "fc2", 1)
    passes.transfer_optimizer(optimizer, net.module, new.module, record)
    after = dict(new.module.named_parameters())
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.1]
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(after["fc1.weight"]), id(after["fc1.bias"])}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(after)
