"""CUDA: the engines on a GPU give the CPU's results, and passes on CUDA tensors preserve the
function. Skipped (with the reason) where no CUDA device is available; tests/test_devices.py
covers the device bookkeeping without one (on the meta device)."""
from pathlib import Path

import pytest
import torch

import passes
from graphgrow.compiler.io import load_network
from graphgrow.compiler.tracing import random_input
from graphgrow.mgopt import run as mgopt_run
from graphgrow.sensli import grow

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def test_grow_on_cuda_matches_cpu():
    runs = {device: grow(str(ROOT / "specs" / "fnn_spiral.yaml"), "spiral", epochs=20, insert_at=[10], lr=0.2,
                         device=device, log_steps=False) for device in ("cpu", "cuda")}
    assert runs["cuda"].network.device.type == "cuda"
    assert runs["cuda"].insertions[0]["positions"] == runs["cpu"].insertions[0]["positions"]
    for split in ("train", "test"):
        assert relative(runs["cuda"].summary["final"][split]["loss"], runs["cpu"].summary["final"][split]["loss"]) < 1e-4
    cpu_state, cuda_state = runs["cpu"].network.state(), runs["cuda"].network.state()
    for name, value in cpu_state.items():
        assert torch.allclose(cuda_state[name].cpu(), value, rtol=1e-4, atol=1e-6), name


def test_mgopt_on_cuda_matches_cpu():
    runs = {device: mgopt_run(str(ROOT / "specs" / "resnet_ode.yaml"), "spiral", epochs=2, batch=150, K=2,
                              kappa=0.1, device=device, export=False, log_steps=False) for device in ("cpu", "cuda")}
    assert runs["cuda"].network.device.type == "cuda"
    assert runs["cuda"].summary["final"]["corrections"] == runs["cpu"].summary["final"]["corrections"]
    assert relative(runs["cuda"].summary["final"]["train"]["loss"], runs["cpu"].summary["final"]["train"]["loss"]) < 1e-4


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_passes_on_cuda_stay_there_and_preserve_the_function(spec):
    network = load_network(str(spec), 0).to("cuda", torch.float64)
    network.module.eval()
    graph = network.graph  # token ids for a token model (gpt_tiny)
    x = random_input(graph.input_shape, 4, torch.float64, graph.input_tokens).to("cuda")
    reference = network(x)
    results = [passes.extend_all(network, "layers")[0]]
    results += [passes.insert_identity(network, p)[0] for p in passes.legal_positions(network.graph)[:2]]
    results += [passes.widen(network, layer, 2)[0] for layer in passes.widenable(network.graph)[:2]]
    # prune scores units where the network lives: the 2 new units (zero outgoing weights) go, exactly
    results += [passes.prune(passes.widen(network, layer, 2)[0], layer, count=2)[0]
                for layer in passes.widenable(network.graph)[:2]]
    results += [passes.insert_block(network, block.output)[0] for block in passes.find_blocks(network.graph)[:2]]
    results += [passes.widen(network, layer, 1, method=m)[0] for layer in passes.head_layers(network.graph)[:1]
                for m in ("sensli", "split")]
    for result in results:
        assert all(t.device.type == "cuda" for t in result.state().values())
        result.module.eval()
        out = result(x)
        for a, b in zip(out if isinstance(out, tuple) else (out,), reference if isinstance(reference, tuple) else (reference,)):
            assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_gradmax_widening_on_cuda_matches_cpu():
    from graphgrow.runtime.data import spiral
    from graphgrow.sensli.widening import widen_best
    runs = {device: widen_best(load_network(str(ROOT / "specs" / "fnn_spiral_deep.yaml"), 0).to(device, torch.float64),
                               spiral(0), count=2, init="gradmax") for device in ("cpu", "cuda")}
    assert runs["cuda"][0].device.type == "cuda"
    assert [(c.layer, c.index, c.init) for c in runs["cuda"][1]] == [(c.layer, c.index, c.init) for c in runs["cpu"][1]]
    for name, value in runs["cpu"][0].state().items():
        assert torch.allclose(runs["cuda"][0].state()[name].cpu(), value, rtol=1e-8, atol=1e-10), name


def test_an_mgopt_run_on_cuda_resumes_on_cuda_in_its_dtype(tmp_path, monkeypatch):
    """The checkpoint is read onto the CPU; the resumed network, the iterate and the momentum
    buffer go back to the GPU in float64 and the run ends where the uninterrupted one ends."""
    from graphgrow.mgopt.optimizer import MultilevelOptimizer
    from graphgrow.runtime.checkpoint import load_checkpoint
    from test_checkpoint import killed_in
    spec = str(ROOT / "specs" / "resnet_ode.yaml")
    options = dict(epochs=2, batch=150, K=2, kappa=0.1, momentum=0.5, device="cuda", dtype="float64",
                   export=False, checkpoint_every=2)
    whole = mgopt_run(spec, "spiral", out=tmp_path / "reference", **options)
    killed_in(monkeypatch, MultilevelOptimizer, "_finish", 5, mgopt_run, spec, "spiral", out=tmp_path / "run", **options)
    assert load_checkpoint(tmp_path / "run").meta["placement"]["device"].startswith("cuda")
    resumed = mgopt_run(resume=tmp_path / "run")
    assert resumed.network.device.type == "cuda" and resumed.network.dtype == torch.float64
    for name, value in whole.network.state().items():
        assert torch.allclose(resumed.network.state()[name], value, rtol=1e-10, atol=1e-12), name


def test_block_candidates_on_cuda_match_cpu():
    from types import SimpleNamespace
    from graphgrow.sensli import sensitivities
    generator = torch.Generator().manual_seed(0)
    data = SimpleNamespace(x_train=torch.randn(8, 3, 32, 32, generator=generator, dtype=torch.float64),
                           y_train=torch.randint(0, 10, (8,), generator=generator))
    reports = {device: sensitivities(load_network(str(ROOT / "specs" / "resnet_small.yaml"), 0).to(device, torch.float64),
                                     data, batch=4, candidates="blocks") for device in ("cpu", "cuda")}
    assert reports["cpu"].candidates
    for cpu, cuda in zip(reports["cpu"].candidates, reports["cuda"].candidates):
        assert cpu.position == cuda.position and relative(cuda.merit, cpu.merit) < 1e-8
