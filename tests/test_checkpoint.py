"""Checkpoint and resume: a run killed with SIGKILL and resumed ends bitwise where an
uninterrupted run ends (final weights, final spec bytes, the log apart from times and resume
records). The runs go through the command line in subprocesses, killed after a chosen number of
log records (whatever the machine's speed, the kill lands somewhere after that point)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from graphgrow.cli import main
from graphgrow.runtime.checkpoint import CHECKPOINTS, LATEST, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SPIRAL = str(ROOT / "specs" / "fnn_spiral.yaml")
RESUME_EVENTS = {"resume", "checkpoint_skipped", "interrupted"}
TIMEOUT = 600  # generous: the suite shares two cores with other work


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "graphgrow.cli", *args, "--quiet"]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def log_lines(rundir: Path) -> int:
    try:
        return (rundir / "log.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_killed(args: list[str], rundir: Path, after_lines: int, sig: int = signal.SIGKILL) -> int:
    """Start ``graphgrow ARGS``, send ``sig`` once its log has ``after_lines`` lines and a checkpoint
    exists; returns the exit status. Fails if the run ends first."""
    process = subprocess.Popen(command(*args), cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while log_lines(rundir) < after_lines or not (rundir / CHECKPOINTS / LATEST).exists():
            assert process.poll() is None, f"the run ended before the kill point: {process.communicate()}"
            assert time.monotonic() < deadline, "the run did not reach the kill point in time"
            time.sleep(0.01)
        process.send_signal(sig)
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, out, err


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command(*args), cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def reference(args: list[str], rundir: Path) -> None:
    """The uninterrupted run, in this process (one thread, as the subprocesses)."""
    assert main([*args, "--out", str(rundir), "--quiet"]) == 0


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if "time" not in k and "seconds" not in k}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def read_records(rundir: Path) -> list[dict]:
    lines = (rundir / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    expected = torch.load(uninterrupted / "final.pt", weights_only=True)
    got = torch.load(resumed / "final.pt", weights_only=True)
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert (resumed / "final.yaml").read_bytes() == (uninterrupted / "final.yaml").read_bytes()
    kept = [without_times(r) for r in read_records(resumed) if r["event"] not in RESUME_EVENTS]
    assert kept == [without_times(r) for r in read_records(uninterrupted)]
    assert any(r["event"] == "resume" for r in read_records(resumed))


GROW = ["grow", SPIRAL, "--epochs", "8", "--insert-at", "4", "--max-insertions", "1", "--lr", "0.2"]


def test_sigkill_before_and_after_growth_resumes_bitwise_with_momentum(tmp_path):
    args = [*GROW, "--batch", "32", "--momentum", "0.9", "--checkpoint-every", "7"]  # 15 steps an epoch
    reference(args, tmp_path / "reference")
    records = read_records(tmp_path / "reference")
    growth = next(i for i, r in enumerate(records) if r["event"] == "insertion")
    pick = random.Random(12)
    run = tmp_path / "run"
    status, _, _ = run_killed([*args, "--out", str(run)], run, pick.randrange(20, growth - 40))
    assert status == -signal.SIGKILL
    status, _, _ = run_killed(["grow", "--resume", str(run)], run, pick.randrange(growth + 5, len(records) - 60))
    assert status == -signal.SIGKILL
    before = load_checkpoint(run)
    run_cli(["grow", "--resume", str(run)])
    assert_same_run(run, tmp_path / "reference")
    assert before.meta["step"] > 0
