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
from graphgrow.mgopt.optimizer import MultilevelOptimizer
from graphgrow.runtime.checkpoint import CHECKPOINTS, LATEST, load_checkpoint
from graphgrow.runtime.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
SPIRAL = str(ROOT / "specs" / "fnn_spiral.yaml")
RESUME_EVENTS = {"resume", "checkpoint_skipped", "interrupted"}
TIMEOUT = 600  # generous: the suite shares two cores with other work


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "graphgrow", *args, "--quiet"]


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
    summaries = [json.loads((run / "summary.json").read_text()) for run in (resumed, uninterrupted)]
    assert without_times(summaries[0]) == without_times(summaries[1])  # FLOP ledger, insertions, metrics
    assert any(r["event"] == "resume" for r in read_records(resumed))


GROW = ["grow", SPIRAL, "--epochs", "6", "--insert-at", "3", "--max-insertions", "1", "--lr", "0.2"]


def test_sigkill_before_growth_resumes_bitwise_with_momentum_and_mid_epoch_checkpoints(tmp_path):
    args = [*GROW, "--batch", "32", "--momentum", "0.9", "--checkpoint-every", "7"]  # 15 steps an epoch
    reference(args, tmp_path / "reference")
    records = read_records(tmp_path / "reference")
    growth = next(i for i, r in enumerate(records) if r["event"] == "insertion")
    run = tmp_path / "run"
    status, _, _ = run_killed([*args, "--out", str(run)], run, random.Random(12).randrange(18, growth - 20))
    assert status == -signal.SIGKILL
    assert load_checkpoint(run).meta["step"] < records[growth]["iteration"]
    assert main(["grow", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(run, tmp_path / "reference")


def test_sigterm_then_sigkill_around_widening_resumes_bitwise_with_adam(tmp_path):
    args = [*GROW, "--batch", "64", "--optimizer", "adam", "--lr", "0.01", "--widen", "2"]
    reference(args, tmp_path / "reference")
    records = read_records(tmp_path / "reference")
    growth = next(i for i, r in enumerate(records) if r["event"] == "widening")
    assert records[growth]["inserted"]
    pick = random.Random(34)
    run = tmp_path / "run"
    status, _, err = run_killed([*args, "--out", str(run)], run, pick.randrange(10, growth - 12), signal.SIGTERM)
    assert status == 143, err
    assert f"resume with: graphgrow grow --resume {run}" in err and "Traceback" not in err
    assert read_records(run)[-1]["event"] == "interrupted"
    status, _, _ = run_killed(["grow", "--resume", str(run)], run, pick.randrange(growth + 3, len(records) - 25))
    assert status == -signal.SIGKILL
    assert load_checkpoint(run).meta["step"] >= records[growth]["iteration"]  # the grown network was saved
    assert main(["grow", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(run, tmp_path / "reference")


# -- in one process: a write cut short, a damaged checkpoint, wrong uses of --resume -----------

class Killed(BaseException):
    """Stands for the process dying (nothing in the run catches it)."""


IN_PROCESS = dict(epochs=6, insert_at=[3], max_insertions=1, lr=0.2, batch=64, momentum=0.5, export=False,
                  checkpoint_every=5)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    from graphgrow.sensli import grow
    out = tmp_path_factory.mktemp("finished") / "run"
    grow(SPIRAL, out=out, **IN_PROCESS)
    return out


def test_a_write_cut_short_and_a_damaged_checkpoint_fall_back_to_the_previous_one(tmp_path, finished, monkeypatch):
    from graphgrow.runtime import checkpoint
    from graphgrow.sensli import grow
    real_write, state_writes = checkpoint.write_synced, []

    def dying_write(path, data):  # the 7th checkpoint's state file gets half written, then the process dies
        if path.name == checkpoint.STATE_NAME:
            state_writes.append(path)
            if len(state_writes) == 7:
                path.write_bytes(data[:len(data) // 2])
                raise Killed
        real_write(path, data)

    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "write_synced", dying_write)
    with pytest.raises(Killed):
        grow(SPIRAL, out=run, **IN_PROCESS)
    monkeypatch.setattr(checkpoint, "write_synced", real_write)
    root = run / CHECKPOINTS
    torn = [p.name for p in root.iterdir() if p.name.endswith(".partial")]
    assert torn == [state_writes[-1].parent.name]  # never renamed
    complete = sorted((p.name for p in root.glob("step-*")), reverse=True)
    assert len(complete) == 2 and (root / LATEST).read_text().strip() == complete[0]
    assert load_checkpoint(run).directory.name == complete[0]
    # damage the latest checkpoint too: the one before it must be used, and the log say so
    state = root / complete[0] / "state.pt"
    state.write_bytes(state.read_bytes()[:-10] + b"0123456789")
    fallback = load_checkpoint(run)
    assert fallback.directory.name == complete[1] and fallback.skipped[0][0] == complete[0]
    with open(run / "log.jsonl", "a") as log:  # and the log's last record cut short
        log.write('{"event": "st')
    grow(resume=run)
    assert_same_run(run, finished)
    skipped = [r for r in read_records(run) if r["event"] == "checkpoint_skipped"]
    assert [r["checkpoint"] for r in skipped] == [complete[0]] and "checksum" in skipped[0]["reason"]
    assert not any(p.name.endswith(".partial") for p in root.iterdir()) and len(list(root.glob("step-*"))) == 2


def test_resume_refuses_conflicting_options_a_finished_run_and_a_directory_without_checkpoints_and_bad_intervals(tmp_path, finished, capsys):
    assert main(["grow", "--resume", str(finished), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "option conflicts with the resumed run: lr=0.5 (run: 0.2)" in err and len(err.splitlines()) == 1
    assert main(["grow", "--resume", str(finished), "--lr", "0.1"]) == 2  # the default, but not the run's
    assert "lr=0.1 (run: 0.2)" in capsys.readouterr().err
    assert main(["grow", "--resume", str(finished), "--lr", "0.2", "--quiet"]) == 2  # the same value: allowed,
    assert "run has finished" in capsys.readouterr().err                            # but this run is done
    assert main(["grow", SPIRAL, "--resume", str(finished)]) == 2
    assert "keeps its spec" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["grow", "--resume", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["mgopt"]) == 2
    assert "mgopt needs a spec (hint: give a spec, or --resume RUNDIR" in capsys.readouterr().err
    assert main(["grow", SPIRAL, "--checkpoint-every", "0", "--out", str(tmp_path / "new")]) == 2
    assert "checkpoint_every must be a positive number of steps, got 0" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_sigkill_during_an_mgopt_depth_hierarchy_run_resumes_bitwise(tmp_path):
    args = ["mgopt", str(ROOT / "specs" / "resnet_ode.yaml"), "--hierarchy", "depth", "--levels", "2",
            "--epochs", "3", "--batch", "50", "--checkpoint-every", "4"]
    reference(args, tmp_path / "reference")
    records = read_records(tmp_path / "reference")
    assert any(r.get("kind") == "cgc" for r in records)  # coarse corrections happen, so the coarse level matters
    run = tmp_path / "run"
    status, _, _ = run_killed([*args, "--out", str(run)], run, random.Random(56).randrange(8, len(records) - 12))
    assert status == -signal.SIGKILL
    assert main(["mgopt", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(run, tmp_path / "reference")


def killed_in(monkeypatch, owner, method: str, index: int, function, *args, **options) -> None:
    """function(*args, **options) with the process dying in ``owner.method`` (of the trainer or
    the MG/Opt optimizer, which count ``iteration``) when called at iteration ``index``."""
    real = getattr(owner, method)

    def dying(self, *arguments):
        if self.iteration == index:
            raise Killed
        return real(self, *arguments)

    monkeypatch.setattr(owner, method, dying)
    with pytest.raises(Killed):
        function(*args, **options)
    monkeypatch.setattr(owner, method, real)


def test_the_preconditioners_statistics_resume_with_the_run(tmp_path, monkeypatch):
    from graphgrow.sensli import grow
    options = dict(epochs=4, insert_at=[2], max_insertions=1, lr=0.05, batch=90, optimizer="frobenius",
                   export=False, checkpoint_every=3)
    grow(SPIRAL, out=tmp_path / "reference", **options)
    # the process dies in step 14 (after growth; checkpoint at 12)
    killed_in(monkeypatch, Trainer, "step", 13, grow, SPIRAL, out=tmp_path / "run", **options)
    saved = load_checkpoint(tmp_path / "run")
    assert saved.meta["step"] == 12
    optimizer_state = saved.state["trainer"]["optimizer"]["state"]
    assert any(key.endswith("_operator") or key.endswith("_inner_inverse") for s in optimizer_state.values() for key in s)
    grow(resume=tmp_path / "run")
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_ctrl_c_writes_a_checkpoint_and_raises_with_the_resume_command(tmp_path, finished, monkeypatch):
    from graphgrow.runtime.interrupts import RunInterrupted
    from graphgrow.sensli import grow
    real_step = Trainer.step

    def step_then_ctrl_c(self, x, y):  # Ctrl-C arrives during step 28, between checkpoints
        result = real_step(self, x, y)
        if self.iteration == 28:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "step", step_then_ctrl_c)
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted) as stop:
        grow(SPIRAL, out=run, **IN_PROCESS)
    monkeypatch.setattr(Trainer, "step", real_step)
    assert stop.value.exit_status == 130 and stop.value.command == f"graphgrow grow --resume {run}"
    assert load_checkpoint(run).meta["step"] == 28 and read_records(run)[-1]["event"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone
    grow(resume=run)
    assert_same_run(run, finished)


def test_a_full_disk_stops_the_run_with_an_error_and_keeps_the_previous_checkpoint(tmp_path, finished, monkeypatch):
    import errno
    from graphgrow.errors import GraphgrowError
    from graphgrow.runtime import checkpoint
    from graphgrow.sensli import grow
    real_write, writes = checkpoint.write_synced, []

    def disk_full(path, data):
        writes.append(path)
        if len(writes) > 9:  # the fourth checkpoint (three files each)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "write_synced", disk_full)
    with pytest.raises(GraphgrowError, match="cannot write checkpoint step-000020: No space left on device"):
        grow(SPIRAL, out=tmp_path / "run", **IN_PROCESS)
    monkeypatch.setattr(checkpoint, "write_synced", real_write)
    assert sorted(p.name for p in (tmp_path / "run" / CHECKPOINTS).iterdir()) == [LATEST, "step-000010", "step-000015"]
    grow(resume=tmp_path / "run")
    assert_same_run(tmp_path / "run", finished)


def test_nested_iteration_resumes_bitwise_from_inside_its_coarse_phase(tmp_path, monkeypatch):
    from graphgrow.mgopt import run
    options = dict(hierarchy="depth", levels=3, variant="nested", epochs=2, batch=150, nested_epochs=2,
                   export=False, checkpoint_every=2)
    spec = str(ROOT / "specs" / "resnet_ode.yaml")
    run(spec, out=tmp_path / "reference", **options)
    # dies in iteration 10 of 18: level 2 (6) done, level 1 at 2 of 6
    killed_in(monkeypatch, MultilevelOptimizer, "_finish", 9, run, spec, out=tmp_path / "run", **options)
    assert load_checkpoint(tmp_path / "run").meta["phase"] == [1, 2]  # level 1, two of its iterations done
    run(resume=tmp_path / "run")
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_float64_nested_iteration_with_momentum_resumes_bitwise_in_float64(tmp_path, monkeypatch):
    """The flat iterate and the momentum buffer of a coarse level are part of the checkpoint,
    and the resumed network is rebuilt in the run's dtype."""
    from graphgrow.mgopt import run
    options = dict(hierarchy="depth", levels=2, variant="nested", epochs=1, batch=150, nested_epochs=2,
                   momentum=0.5, restriction="injection", dtype="float64", export=False, checkpoint_every=2)
    spec = str(ROOT / "specs" / "resnet_ode.yaml")
    run(spec, out=tmp_path / "reference", **options)
    killed_in(monkeypatch, MultilevelOptimizer, "_finish", 3, run, spec, out=tmp_path / "run", **options)  # coarse phase
    saved = load_checkpoint(tmp_path / "run")
    assert saved.meta["phase"] == [1, 2] and saved.meta["placement"] == {"device": "cpu", "dtype": "float64"}
    assert saved.state["optimizer"]["velocity"] is not None
    run(resume=tmp_path / "run")
    assert_same_run(tmp_path / "run", tmp_path / "reference")
    assert all(t.dtype == torch.float64 for t in torch.load(tmp_path / "run" / "final.pt", weights_only=True).values()
               if t.is_floating_point())


def test_a_float64_growth_run_resumes_bitwise_in_float64(tmp_path, monkeypatch):
    from graphgrow.sensli import grow
    options = dict(IN_PROCESS, epochs=4, insert_at=[2], dtype="float64")
    grow(SPIRAL, out=tmp_path / "reference", **options)
    killed_in(monkeypatch, Trainer, "step", 16, grow, SPIRAL, out=tmp_path / "run", **options)  # past step 15's checkpoint
    assert load_checkpoint(tmp_path / "run").meta["placement"]["dtype"] == "float64"
    grow(resume=tmp_path / "run")
    assert_same_run(tmp_path / "run", tmp_path / "reference")
    assert torch.load(tmp_path / "run" / "final.pt", weights_only=True)["fc1.weight"].dtype == torch.float64
