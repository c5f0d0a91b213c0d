"""Shared fixtures: the shipped specs and a helper that writes small spec texts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The suite's networks are small: one intra-op thread is faster for them, and on a shared
# 2-core machine (CI) torch's default threads oversubscribe the cores many times over.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = ROOT / "specs"


def make_spec_text(layers: list[str] | str, shape=(2,), name: str = "net", extra: str = "") -> str:
    """Spec text (format 1) with the given layer lines (each a YAML flow mapping or block)."""
    if isinstance(layers, str):
        layers = [layers]
    body = "".join(f"  - {layer}\n" for layer in layers)
    return (f"graphgrow: 1\nname: {name}\ninput: {{shape: {list(shape)}}}\n{extra}"
            f"layers:\n{body}")


@pytest.fixture
def specs_dir() -> Path:
    return SPECS_DIR


@pytest.fixture
def make_spec():
    """``make_spec(layers, shape=(2,), name='net', extra='')`` -> spec text; layer i is on
    line 5 + i when ``extra`` is empty."""
    return make_spec_text


def assert_next_step_unchanged(network, grow, optimizer_class, hyper: dict, x, y, rtol: float = 0.0,
                               atol: float = 1e-12) -> None:
    """Train ``network`` three steps (squared error on x, y), grow it (``grow(network) ->
    (network, record)``), carry the optimizer over (passes.transfer_optimizer) and take one more
    step on both the grown and an unpassed twin: every old entry (where the record puts it) of
    the grown network equals the twin's."""
    import copy

    import passes
    optimizer = optimizer_class(network.module.parameters(), **hyper)

    def step(module, opt):
        opt.zero_grad()
        ((module(x) - y) ** 2).mean().backward()
        opt.step()

    for _ in range(3):
        step(network.module, optimizer)
    twin = copy.deepcopy(network.module)
    twin_optimizer = optimizer_class(twin.parameters(), **hyper)
    twin_optimizer.load_state_dict(optimizer.state_dict())
    grown, record = grow(network)
    passes.transfer_optimizer(optimizer, network.module, grown.module, record)
    step(grown.module, optimizer)
    step(twin, twin_optimizer)
    expected = dict(twin.named_parameters())
    for name, param in grown.module.named_parameters():
        # the old entries where the record puts them (leading corners; after a concat also further on)
        place = lambda tensor: record.derive_state(name, [tensor])
        old_entries = place(torch.ones_like(expected[name])) != 0
        assert int(old_entries.sum()) == expected[name].numel()
        torch.testing.assert_close(param.detach()[old_entries], place(expected[name].detach())[old_entries],
                                   rtol=rtol, atol=atol)
