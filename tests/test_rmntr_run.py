"""The RMNTR engine end to end: run directory, per-step log, plots, CLI, user errors."""
import json
from pathlib import Path

import pytest
import torch

from graphgrow import GraphgrowError
from graphgrow.cli import main
from graphgrow.ir import graph_from_text
from graphgrow.rmntr import l1_weights, run
from graphgrow.compiler.network import Network

SPEC = Path(__file__).resolve().parent.parent / "specs" / "pinn_60.yaml"
STEP_FIELDS = {"level", "iteration", "kind", "F", "h", "radius", "rho", "predicted", "actual", "step_norm",
               "accepted", "gradients", "hvps", "values", "work", "elapsed"}


def test_a_pinn_run_writes_its_directory(tmp_path):
    graph = graph_from_text(SPEC.read_text().replace("width: 60", "width: 8"), str(SPEC))
    result = run(graph, "pinn", levels=2, beta=1e-3, max_iterations=3, spg_iterations=3, coarse_iterations=2,
                 kappa_h=0.1, warmup=5, out=tmp_path / "run", export=False)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"log.jsonl", "summary.json", "final.yaml", "final.pt", "progress.png", "sparsity.png"} <= names
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    assert steps and all(STEP_FIELDS <= set(r) for r in steps)
    assert {r["kind"] for r in steps} <= {"taylor", "recursive"}
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["final"]
    assert final["iterations"] == 3 and 0 <= final["zero_share"] <= 1 and final["l2_error"] > 0
    assert next(result.network.module.parameters()).dtype == torch.float64
    assert final["F"] == pytest.approx(result.result.value)


def test_l1_weights_choose_parameters():
    graph = graph_from_text(SPEC.read_text().replace("width: 60", "width: 4"), str(SPEC))
    network = Network.build(graph, dtype=torch.float64)
    # hidden.weight 8, hidden.bias 4, head.weight 4, head.bias 1
    assert l1_weights(network, 0.5, "weights").tolist() == [0.5] * 8 + [0.0] * 4 + [0.5] * 4 + [0.0]
    assert l1_weights(network, 0.5, "all").tolist() == [0.5] * 17
    assert l1_weights(network, 0.5, ["head"]).tolist() == [0.0] * 12 + [0.5] * 5
    with pytest.raises(GraphgrowError, match="unknown layer"):
        l1_weights(network, 0.5, ["nope"])
    with pytest.raises(GraphgrowError, match="non-negative"):
        l1_weights(network, -1.0, "all")


def test_cli_runs_on_a_data_set_and_reports_user_errors_in_one_line(tmp_path, capsys):
    code = main(["rmntr", "specs/fnn_spiral_deep.yaml", "--data", "spiral", "--levels", "2", "--max-iterations", "2",
                 "--spg-iterations", "3", "--quiet", "--out", str(tmp_path / "cli")])
    assert code == 0
    out = capsys.readouterr().out
    assert "RMNTR on width0" in out and "coarse steps accepted/tried" in out
    assert (tmp_path / "cli" / "summary.json").exists()
    code = main(["rmntr", "specs/fnn_spiral_deep.yaml", "--data", "pinn", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "R^2 -> R" in err
    code = main(["rmntr", "specs/resnet_ode.yaml", "--data", "spiral", "--hierarchy", "depth", "--levels", "5",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_float32_networks_run_in_float32():
    graph = graph_from_text(SPEC.read_text().replace("width: 60", "width: 4"), str(SPEC))
    result = run(graph, "pinn", levels=2, beta=1e-3, max_iterations=3, spg_iterations=3, coarse_iterations=2,
                 kappa_h=0.1, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in result.network.module.parameters())
    assert result.result.x.dtype == torch.float32
    steps = [r for r in result.records if r["event"] == "step" and r["level"] == 0]
    assert result.result.value < steps[0]["F"]
