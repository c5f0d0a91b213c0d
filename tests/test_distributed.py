"""Data-parallel growth (runtime.distributed): two ranks on 127.0.0.1 with gloo, with bounded
timeouts. Both ranks end with identical parameters and optimizer state, choose the position a
single process chooses, and match a single-process run on the same global batches to 1e-10
(float64; float32: 1e-5 relative); a rank that picks another candidate stops both; a dead rank stops the other."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graphgrow.cli import main
from graphgrow.runtime.distributed import DataParallel, free_port, network_digest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_worker import SCENARIOS, run_mgopt, run_scenario  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results of every scenario (tests/distributed_worker.py), and rank 0's report
    after rank 1 died in the middle of a run."""
    out = tmp_path_factory.mktemp("ranks")
    port = str(free_port())
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(out), "dead"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
                                     "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
                                     "LOCAL_RANK": str(rank)}) for rank in range(2)]
    try:
        logs = [w.communicate(timeout=600)[0].decode() for w in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert (out / "rank0.pt").exists() and (out / "rank1.pt").exists(), logs
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return results, (out / "dead0.txt").read_text(), [w.returncode for w in workers]


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_close(a: dict, b: dict, tolerance: float, relative: bool = False) -> None:
    """Within ``tolerance`` (absolute; with ``relative`` relative to the largest entry)."""
    assert a.keys() == b.keys()
    for key in a:
        scale = b[key].abs().max() if relative else 1.0
        assert (a[key] - b[key]).abs().max() <= tolerance * scale, key


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_agree_with_each_other_and_with_one_process(ranks, scenario):
    (rank0, rank1), _, _ = ranks
    single = run_scenario(scenario)
    assert rank0[scenario]["positions"] == rank1[scenario]["positions"] == single["positions"] != []
    for moment in ("after_growth", "end"):
        for part in ("params", "optimizer"):
            assert_identical(rank0[scenario][moment][part], rank1[scenario][moment][part])
            if SCENARIOS[scenario][1] == torch.float64:
                assert_close(rank0[scenario][moment][part], single[moment][part], 1e-10)
            else:
                assert_close(rank0[scenario][moment][part], single[moment][part], 1e-5, relative=True)
    if not scenario.startswith("insert"):  # momentum buffers / Adam moments exist and were carried
        assert rank0[scenario]["end"]["optimizer"]
    tolerance = 1e-12 if SCENARIOS[scenario][1] == torch.float64 else 1e-5
    assert rank0[scenario]["final"]["train"]["loss"] == pytest.approx(single["final"]["train"]["loss"], rel=tolerance)


def test_mgopt_on_two_ranks_matches_one_process(ranks):
    (rank0, rank1), _, _ = ranks
    single = run_mgopt()
    assert_identical(rank0["mgopt"]["params"], rank1["mgopt"]["params"])
    assert_close(rank0["mgopt"]["params"], single["params"], 1e-10)
    assert rank0["mgopt"]["corrections"] == single["corrections"] > 0
    assert rank0["mgopt"]["final"]["loss"] == pytest.approx(single["final"]["loss"], rel=1e-12)


def test_a_rank_that_picks_another_candidate_stops_both(ranks):
    (rank0, rank1), _, _ = ranks
    for rank in (rank0, rank1):
        outcome = rank["disagreement"]
        assert outcome is not None and "disagree with rank 0" in outcome["message"]
        assert outcome["seconds"] < 30


def test_a_dead_rank_stops_the_other_with_an_error(ranks):
    _, report, codes = ranks
    seconds, message = report.split("\n", 1)
    assert "another rank stopped" in message and float(seconds) < 30
    assert codes == [0, 3]


def test_the_digest_sees_positions_graph_and_state():
    from graphgrow.compiler.io import load_network
    network = load_network(str(ROOT / "specs" / "fnn_spiral.yaml"), 0)
    digest = network_digest(network, {"positions": ["layer:act1"]})
    assert digest != network_digest(network, {"positions": ["layer:act2"]})
    with torch.no_grad():
        network.module.fc1.weight[0, 0] += 1e-7
    assert digest != network_digest(network, {"positions": ["layer:act1"]})


def test_parts_of_a_batch_cover_it_once():
    for size in (0, 1, 7, 450):
        parts = [DataParallel(rank, 3, torch.device("cpu")).part(size) for rank in range(3)]
        assert sum((list(range(size))[p] for p in parts), []) == list(range(size))


def test_the_cli_with_two_ranks_writes_one_run_directory_like_one_process(tmp_path, capsys):
    spec = str(ROOT / "specs" / "fnn_spiral_deep.yaml")
    common = ["grow", spec, "--epochs", "4", "--insert-at", "2", "--lr", "0.2", "--dtype", "float64",
              "--device", "cpu", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--nproc", "2", "--dist-timeout", "60", "--out", str(tmp_path / "two")]) == 0
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert two["insertions"][0]["positions"] == one["insertions"][0]["positions"]
    for split in ("train", "test"):
        assert two["final"][split]["loss"] == pytest.approx(one["final"][split]["loss"], rel=1e-10)
        assert two["final"][split]["error"] == one["final"][split]["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_torchrun_runs_the_cli_like_one_process(tmp_path):
    """The launcher itself (torch.distributed.run, what the torchrun script runs), not only the
    environment it sets: rendezvous, TORCHELASTIC_* variables, its signal forwarding and exit."""
    spec = str(ROOT / "specs" / "fnn_spiral_deep.yaml")
    common = ["grow", spec, "--epochs", "4", "--insert-at", "2", "--lr", "0.2", "--dtype", "float64",
              "--device", "cpu", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "graphgrow", *common, "--dist-timeout", "60", "--out", str(tmp_path / "two")],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert two["insertions"][0]["positions"] == one["insertions"][0]["positions"]
    for split in ("train", "test"):
        assert two["final"][split]["loss"] == pytest.approx(one["final"][split]["loss"], rel=1e-10)
        assert two["final"][split]["error"] == one["final"][split]["error"]
    weights = [torch.load(tmp_path / d / "final.pt") for d in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-10, atol=1e-12)


def test_batchnorm_and_the_preconditioner_are_refused_with_a_hint(tmp_path, make_spec):
    from graphgrow.compiler.io import load_network
    from graphgrow.runtime.distributed import refusal
    spec = tmp_path / "bn.yaml"
    spec.write_text(make_spec(["{name: fc, op: linear, out: 4}", "{name: norm, op: batchnorm}",
                               "{name: head, op: linear, out: 2}"]))
    error = refusal(load_network(str(spec), 0), "sgd")
    assert error is not None and error.node == "norm" and "batchnorm" in error.message and error.hint
    fnn = load_network(str(ROOT / "specs" / "fnn_spiral.yaml"), 0)
    error = refusal(fnn, "frobenius")
    assert error is not None and "preconditioner" in error.message and error.hint
    assert refusal(fnn, "adam") is None


def test_a_bad_process_count_is_one_line(capsys):
    assert main(["grow", str(ROOT / "specs" / "fnn_spiral.yaml"), "--epochs", "1", "--nproc", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nproc must be a positive integer" in err[0]
