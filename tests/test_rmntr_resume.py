"""Checkpoints and --resume of RMNTR runs: a run stopped by SIGINT (in process) or SIGTERM (the
command line, in a subprocess) writes a checkpoint, exits 130 / 143, and the resumed run ends
bitwise where the uninterrupted one ends (final weights and spec, the log and the summary apart
from times and the resume records)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from graphgrow import GraphgrowError
from graphgrow.cli import main
from graphgrow.rmntr import RMNTR, run
from graphgrow.runtime.checkpoint import CHECKPOINTS, LATEST, RunInterrupted, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RESUME_EVENTS = {"resume", "checkpoint_skipped", "interrupted"}
CLI = "import sys; from graphgrow.cli import main; sys.exit(main(sys.argv[1:]))"


def narrow_spec(tmp_path: Path, width: int = 6) -> str:
    path = tmp_path / f"pinn_{width}.yaml"
    path.write_text((ROOT / "specs" / "pinn_60.yaml").read_text().replace("width: 60", f"width: {width}"))
    return str(path)


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items()
                if "time" not in k and "seconds" not in k and k != "elapsed"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def records(rundir: Path) -> list[dict]:
    return [json.loads(line) for line in (rundir / "log.jsonl").read_text().splitlines()]


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    expected = torch.load(uninterrupted / "final.pt", weights_only=True)
    got = torch.load(resumed / "final.pt", weights_only=True)
    assert list(got) == list(expected) and all(torch.equal(got[n], expected[n]) for n in expected)
    assert (resumed / "final.yaml").read_bytes() == (uninterrupted / "final.yaml").read_bytes()
    kept = [without_times(r) for r in records(resumed) if r["event"] not in RESUME_EVENTS]
    assert kept == [without_times(r) for r in records(uninterrupted)]
    summaries = [json.loads((d / "summary.json").read_text()) for d in (resumed, uninterrupted)]
    assert without_times(summaries[0]) == without_times(summaries[1])
    assert any(r["event"] == "resume" for r in records(resumed))


OPTIONS = dict(levels=2, beta=1e-3, max_iterations=6, spg_iterations=4, coarse_iterations=2, kappa_h=0.2, warmup=20,
               pairing="gradient", export=False)


def test_sigint_writes_a_checkpoint_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    spec = narrow_spec(tmp_path)
    run(spec, "pinn", out=tmp_path / "reference", **OPTIONS)
    real = RMNTR._record

    def record_then_ctrl_c(self, level, iteration, *rest):   # Ctrl-C during fine iteration 3
        real(self, level, iteration, *rest)
        if level == 0 and iteration == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RMNTR, "_record", record_then_ctrl_c)
    rundir = tmp_path / "run"
    with pytest.raises(RunInterrupted) as stop:
        run(spec, "pinn", out=rundir, **OPTIONS)
    monkeypatch.setattr(RMNTR, "_record", real)
    assert stop.value.exit_status == 130 and stop.value.command == f"graphgrow rmntr --resume {rundir}"
    saved = load_checkpoint(rundir)
    assert saved.meta["step"] == 3 and records(rundir)[-1]["event"] == "interrupted"
    assert saved.state["method"]["loop"]["iteration"] == 3 and "control" in saved.state["method"]["loop"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(GraphgrowError, match="conflicts"):
        run(resume=rundir, beta=1e-2)
    run(resume=rundir)
    assert_same_run(rundir, tmp_path / "reference")
    with pytest.raises(GraphgrowError, match="finished"):
        run(resume=rundir)


def test_sigterm_on_the_command_line_exits_143_and_resume_continues_the_lm_member(tmp_path):
    spec = narrow_spec(tmp_path)
    args = ["rmntr", spec, "--data", "pinn", "--model", "levenberg-marquardt", "--beta", "0", "--max-iterations", "8",
            "--spg-iterations", "4", "--coarse-iterations", "2", "--kappa-h", "0.2", "--lm-lambda", "0.1"]
    assert main([*args, "--out", str(tmp_path / "reference"), "--quiet"]) == 0
    rundir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", CLI, *args, "--out", str(rundir), "--quiet"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        # after the second fine iteration's checkpoint, whatever the machine's speed
        while not ((rundir / CHECKPOINTS / LATEST).exists() and load_checkpoint(rundir).meta["step"] >= 2):
            assert process.poll() is None, f"the run ended before the signal: {process.communicate()}"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, err
    assert "graphgrow rmntr --resume" in err and len(err.strip().splitlines()) == 1
    assert records(rundir)[-1]["event"] == "interrupted"
    assert main(["rmntr", "--resume", str(rundir), "--quiet"]) == 0
    assert_same_run(rundir, tmp_path / "reference")
    assert all("lambda" in r for r in records(rundir) if r["event"] == "step")
