"""TorchScript and torch.export artifacts reload and match the eager module."""
import warnings
from pathlib import Path

import pytest
import torch

from graphgrow import GraphgrowError, compile_graph, load_graph
from graphgrow.compiler.export import FORMATS, SUFFIX, example_input, export, load_exported

SPECS = sorted(Path(__file__).resolve().parent.parent.joinpath("specs").glob("*.yaml"))
SMALL = [s for s in SPECS if "autoencoder" not in s.name]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spec", SMALL, ids=lambda p: p.stem)
def test_reloaded_artifact_matches_eager(spec, fmt, tmp_path):
    graph = load_graph(spec)
    module = compile_graph(graph, seed=3)
    path = export(module, graph, tmp_path / f"model{SUFFIX[fmt]}", fmt)
    reloaded = load_exported(path)
    probe = example_input(graph, batch=5)
    module.eval()
    with torch.no_grad():
        assert (reloaded(probe) - module(probe)).abs().max().item() <= 1e-6


def test_export_has_dynamic_batch(tmp_path):
    graph = load_graph(SPECS[0])
    module = compile_graph(graph)
    reloaded = load_exported(export(module, graph, tmp_path / "m.pt2", "export"))
    for batch in (1, 7):
        probe = example_input(graph, batch=batch)
        assert torch.allclose(reloaded(probe), module(probe), atol=1e-6)


def test_export_keeps_training_mode_and_is_eval(tmp_path):
    graph = load_graph(next(s for s in SPECS if s.stem == "fnn_spiral"))
    module = compile_graph(graph)
    module.train()
    export(module, graph, tmp_path / "m.pt", "torchscript")
    assert module.training


def test_torchscript_deprecation_warnings_handled(tmp_path):
    graph = load_graph(SPECS[0])
    module = compile_graph(graph)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_exported(export(module, graph, tmp_path / "m.pt", "torchscript"))
    assert not [w for w in caught if "deprecat" in str(w.message).lower()]


def test_unknown_format_and_missing_file(tmp_path):
    graph = load_graph(SPECS[0])
    with pytest.raises(GraphgrowError, match="unknown export format"):
        export(compile_graph(graph), graph, tmp_path / "m.onnx", "onnx")
    with pytest.raises(GraphgrowError, match="not found"):
        load_exported(tmp_path / "missing.pt2")
