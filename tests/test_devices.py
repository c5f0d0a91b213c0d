"""Devices and dtypes: passes keep every tensor where the network lives (the `meta` device stands
in for an accelerator here: a tensor that passes through the CPU leaves it), float64 runs end to
end through the engines and the CLI, devices by name, export from any device."""
import json
import math
from pathlib import Path

import pytest
import torch

import passes
from graphgrow import Network, load_graph
from graphgrow.cli import main
from graphgrow.compiler.export import export, load_exported
from graphgrow.compiler.io import load_network
from graphgrow.errors import GraphgrowError
from graphgrow.mgopt import run as mgopt_run
from graphgrow.runtime import TrainConfig, train
from graphgrow.runtime.data import spiral
from graphgrow.runtime.devices import place_network, resolve_device, resolve_dtype
from graphgrow.runtime.splits import Split, as_splits, evaluate, place
from graphgrow.sensli import grow, sensitivities
from graphgrow.sensli.widening import widen_best
from passes.hierarchy import block_stages

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
FNN = str(ROOT / "specs" / "fnn_spiral.yaml")


def misplaced(network: Network, dtype=torch.float64) -> list[str]:
    """State entries off the meta device or (floating point) not in ``dtype``."""
    return [name for name, t in network.module.state_dict().items()
            if t.device.type != "meta" or (t.is_floating_point() and t.dtype != dtype)]


def every_pass(network: Network):
    """(name, result network, record) of every pass applicable to ``network``."""
    extended, record = passes.extend_all(network, "layers")
    yield "extend-all layers", extended, record
    # keep_candidates maps from the extended network: chained, its record maps from ``network``
    if record.candidates:
        kept, keep = passes.keep_candidates(extended, record, [next(iter(record.candidates))])
        yield "keep-candidates", kept, record.then(keep)
    for position in passes.legal_positions(network.graph):
        yield (f"insert-identity {position}",) + passes.insert_identity(network, position)
    for layer in passes.widenable(network.graph):
        for method in ("sensli", "split"):
            yield (f"widen {layer} {method}",) + passes.widen(network, layer, 2, method=method)
        # meta tensors have no values to score or measure: the units are named
        yield (f"prune {layer}",) + passes.prune(network, layer, units=[0], measure=False)
    for layer in passes.head_layers(network.graph):  # attention heads
        for method in ("sensli", "split"):
            yield (f"widen heads {layer} {method}",) + passes.widen(network, layer, 2, method=method)
        yield (f"prune heads {layer}",) + passes.prune(network, layer, units=[0], measure=False)
    for block in passes.find_blocks(network.graph):
        yield (f"insert-block {block.output}",) + passes.insert_block(network, block.output)
    if passes.widenable(network.graph):
        neurons, record = passes.extend_all(network, "neurons")
        yield "extend-all neurons", neurons, record
        kept, keep = passes.keep_candidates(neurons, record, [next(iter(record.candidates))])
        yield "keep neurons", kept, record.then(keep)


def make_state(optimizer: torch.optim.Optimizer, network: Network) -> None:
    """One step on a batch of the network's device, so that the optimizer has state there."""
    x = torch.zeros((2, *network.graph.input_shape), device=network.device, dtype=network.dtype)
    out = network.module(x)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_every_pass_keeps_parameters_buffers_and_optimizer_state_on_meta_in_float64(spec):
    network = load_network(str(spec), 0).to("meta", torch.float64)
    assert network.device.type == "meta" and network.dtype == torch.float64 and not misplaced(network)
    optimizers = {"momentum": torch.optim.SGD(network.module.parameters(), lr=0.1, momentum=0.9),
                  "adam": torch.optim.Adam(network.module.parameters(), lr=0.1)}
    for optimizer in optimizers.values():
        make_state(optimizer, network)
    for name, result, record in every_pass(network):
        assert not misplaced(result), (name, misplaced(result))
        for kind, optimizer in optimizers.items():
            # a copy per pass: each pass starts from the same network
            copy = type(optimizer)(network.module.parameters(), **optimizer.defaults)
            copy.load_state_dict(optimizer.state_dict())
            passes.transfer_optimizer(copy, network.module, result.module, record)
            for param, state in copy.state.items():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        assert value.device.type == "meta" and value.dtype == torch.float64, (name, kind, key)
    stages = passes.residual_stages(network.graph) or [s for s in block_stages(network.graph) if len(s) > 1]
    if stages and all(len(stage) % 2 == 0 for stage in stages):  # chains of residual nodes or of equal blocks
        levels = passes.build_hierarchy(network, "depth", 2)
        coarse, transfer = levels[1].network, levels[1].transfer
        assert not misplaced(coarse)
        fine_again = transfer.prolong(dict(coarse.module.state_dict()))
        fine_state = network.module.state_dict()  # float64, and integer buffers (batch-norm counts) stay integer
        assert all(t.device.type == "meta" and t.dtype == fine_state[k].dtype for k, t in fine_again.items())


def test_width_hierarchy_on_meta():
    network = load_network(str(ROOT / "specs" / "fnn_spiral_deep.yaml"), 0).to("meta", torch.float64)
    levels = passes.build_hierarchy(network, "width", 2)
    assert not misplaced(levels[1].network)
    restricted = levels[1].transfer.restrict(dict(network.module.state_dict()))
    assert all(t.device.type == "meta" for t in restricted.values())


def test_network_to_and_build_on_a_device_and_dtype():
    graph = load_graph(FNN)
    network = Network.build(graph, seed=3)
    assert network.device == torch.device("cpu") and network.dtype == torch.float32
    reference = {k: v.clone() for k, v in network.state().items()}
    assert network.to(dtype=torch.float64) is network and network.dtype == torch.float64
    assert all(torch.equal(v.double(), network.state()[k]) for k, v in reference.items())
    on_meta = Network.build(graph, {k: v.to("meta") for k, v in reference.items()}, device="meta",
                            dtype=torch.float64)
    assert not misplaced(on_meta)
    fresh = Network.build(graph, seed=3, device="meta")
    assert fresh.device.type == "meta" and fresh.dtype == torch.float32


@pytest.mark.parametrize("neurons", ["random", "gradmax"])
def test_the_sensli_widening_builds_in_the_networks_dtype(neurons):
    network = load_network(FNN, 0).to(dtype=torch.float64)
    wider, chosen, _, _ = widen_best(network, spiral(0), count=2, init=neurons)
    assert len(chosen) == 2 and wider.graph.num_params() > network.graph.num_params()
    assert wider.dtype == torch.float64 and all(t.dtype == torch.float64 for t in wider.state().values()
                                                if t.is_floating_point())
    x = torch.randn(16, 2, dtype=torch.float64)
    assert torch.allclose(wider(x), network(x), rtol=0, atol=1e-13)  # function preserved in float64


def test_data_are_cast_to_the_networks_dtype_and_evaluate_on_its_device():
    data = spiral(0)
    train_split, test_split = as_splits(data, torch.float64)
    assert train_split.x.dtype == torch.float64 and train_split.y.dtype == torch.int64
    assert as_splits(data)[0].x.dtype == torch.float32
    assert place(train_split, "cpu") is train_split
    network = load_network(FNN, 0).to(dtype=torch.float64)
    result = evaluate(network, test_split)
    manual = torch.nn.functional.cross_entropy(network(test_split.x), test_split.y).item()
    assert result["loss"] == pytest.approx(manual, rel=1e-12)
    x, y = Split(train_split.x, train_split.y).rows(torch.tensor([3, 1]), torch.device("cpu"))
    assert torch.equal(x, train_split.x[[3, 1]]) and torch.equal(y, train_split.y[[3, 1]])


def test_float64_training_through_the_python_api_matches_float32():
    data = spiral(0)
    config = TrainConfig(epochs=5, lr=0.2, log_steps=False)
    results = {dtype: train(load_network(FNN, 0).to(dtype=dtype), data, config)
               for dtype in (torch.float32, torch.float64)}
    assert results[torch.float64].network.dtype == torch.float64
    loss32, loss64 = (results[d].final["train"]["loss"] for d in (torch.float32, torch.float64))
    assert math.isfinite(loss64) and loss64 == pytest.approx(loss32, rel=1e-5)


def test_float64_grow_inserts_without_changing_the_loss():
    result = grow(FNN, "spiral", epochs=6, insert_at=[3], lr=0.2, dtype="float64", device="cpu", log_steps=False)
    assert result.network.dtype == torch.float64
    event, = result.insertions
    # float64 end to end: the insertion preserves the loss to rounding of float64, not float32
    assert abs(event["loss_after"] - event["loss_before"]) < 1e-13
    reference = grow(FNN, "spiral", epochs=6, insert_at=[3], lr=0.2, log_steps=False)
    assert reference.insertions[0]["positions"] == event["positions"]
    assert result.summary["final"]["train"]["loss"] == pytest.approx(reference.summary["final"]["train"]["loss"],
                                                                      rel=1e-5)


def test_float64_mgopt_run_matches_float32():
    spec = str(ROOT / "specs" / "resnet_ode.yaml")
    runs = {dtype: mgopt_run(spec, "spiral", epochs=1, batch=150, K=2, kappa=0.1, dtype=dtype, export=False,
                             log_steps=False) for dtype in ("float32", "float64")}
    assert runs["float64"].network.dtype == torch.float64
    assert runs["float64"].summary["final"]["corrections"] == runs["float32"].summary["final"]["corrections"]
    assert runs["float64"].summary["final"]["train"]["loss"] == pytest.approx(
        runs["float32"].summary["final"]["train"]["loss"], rel=1e-4)


def test_float64_through_the_cli(tmp_path, capsys):
    out = tmp_path / "grow64"
    assert main(["grow", FNN, "--epochs", "4", "--insert-at", "2", "--lr", "0.2", "--dtype", "float64",
                 "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    assert "epoch 2: inserted at" in capsys.readouterr().out
    weights = torch.load(out / "final.pt", weights_only=True)
    assert all(t.dtype == torch.float64 for t in weights.values() if t.is_floating_point())
    assert main(["sensitivities", str(out / "final.yaml"), "--dtype", "float64", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["candidates"]
    assert main(["mgopt", str(ROOT / "specs" / "resnet_ode.yaml"), "--epochs", "1", "--dtype", "float64",
                 "--device", "auto", "--quiet"]) == 0
    assert "coarse corrections taken" in capsys.readouterr().out


def test_devices_by_name():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("float64") is torch.float64 and resolve_dtype(None) is None
    with pytest.raises(GraphgrowError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(GraphgrowError, match="unknown dtype"):
        resolve_dtype("float16")
    network = load_network(FNN, 0)
    assert place_network(network, "cpu", "float64").dtype == torch.float64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_an_unavailable_device_is_one_line_on_the_cli(capsys):
    for device in ("cuda", "cuda:1"):
        assert main(["grow", FNN, "--epochs", "1", "--device", device, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--device {device}: CUDA is not available" in err[0]


def test_an_unavailable_cuda_index_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(GraphgrowError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


def test_export_from_float64_and_refusal_on_meta(tmp_path):
    network = load_network(FNN, 0).to(dtype=torch.float64)
    path = export(network.module, network.graph, tmp_path / "m.pt2")
    x = torch.randn(3, 2, dtype=torch.float64)
    assert torch.equal(load_exported(path)(x), network(x))
    with pytest.raises(GraphgrowError, match="meta device"):
        export(network.to("meta").module, network.graph, tmp_path / "meta.pt2")
