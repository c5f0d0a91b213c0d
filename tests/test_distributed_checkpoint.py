"""Checkpoints of data-parallel runs (2 gloo ranks on 127.0.0.1, bounded timeouts): a 2-rank run
stopped by SIGTERM before its growth event and killed with SIGKILL after it, then resumed with
--nproc 2, ends bitwise where the uninterrupted 2-rank run ends (and resumed in one process,
within 1e-10 in float64); the same for MG/Opt with the signal sent to one rank only (as under
torchrun), where a checkpoint rank 0 cannot write stops both ranks with one error line."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from graphgrow.cli import main
from graphgrow.runtime.checkpoint import CHECKPOINTS, LATEST, load_checkpoint
from graphgrow.runtime.interrupts import InterruptFlag
from graphgrow.runtime.distributed import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_checkpoint import (ROOT, SPIRAL, assert_same_run, command, environment, log_lines,  # noqa: E402
                             read_records)

TIMEOUT = 300  # generous: the suite shares two cores with other work
GROW = ["grow", SPIRAL, "--epochs", "4", "--insert-at", "2", "--lr", "0.2", "--batch", "50", "--momentum", "0.9",
        "--dtype", "float64", "--checkpoint-every", "4", "--no-export", "--dist-timeout", "60"]
MGOPT = ["mgopt", str(ROOT / "specs" / "resnet_ode.yaml"), "--hierarchy", "depth", "--levels", "2", "--epochs", "2",
         "--batch", "50", "--checkpoint-every", "4", "--dtype", "float64", "--no-export", "--dist-timeout", "60"]


def wait_for(rundir: Path, lines: int, processes: list[subprocess.Popen] = ()) -> None:
    """Until the run's log has ``lines`` lines and a checkpoint exists (the processes still running)."""
    deadline = time.monotonic() + TIMEOUT
    while log_lines(rundir) < lines or not (rundir / CHECKPOINTS / LATEST).exists():
        ended = [p for p in processes if p.poll() is not None]
        assert not ended, f"the run ended before the signal: {ended[0].communicate()}"
        assert time.monotonic() < deadline, "the run did not reach the signal's point in time"
        time.sleep(0.01)


def ranks(args: list[str]) -> list[subprocess.Popen]:
    """Two ranks of ``graphgrow ARGS`` started as torchrun starts them (RANK, WORLD_SIZE, ... set)."""
    port = str(free_port())
    return [subprocess.Popen(command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**environment(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                  "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)})
            for rank in range(2)]


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Each process's exit status and stderr (all are killed if one does not end in time)."""
    try:
        errors = [p.communicate(timeout=TIMEOUT)[1] for p in processes]
        return [(p.returncode, err) for p, err in zip(processes, errors)]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def children(pid: int) -> list[int]:
    """Running processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sigterm_to_this_launcher(rundir: Path, lines: int) -> threading.Thread:
    """SIGTERM to this process (the --nproc launcher that main runs here) once the run's log has
    ``lines`` lines and a checkpoint exists."""
    def send():
        wait_for(rundir, lines)
        os.kill(os.getpid(), signal.SIGTERM)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_two_rank_growth_run_stopped_before_and_killed_after_growth_resumes_bitwise(tmp_path, capfd):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main([*GROW, "--nproc", "2", "--out", str(reference), "--quiet"]) == 0
    records = read_records(reference)
    growth = next(i for i, r in enumerate(records) if r["event"] == "insertion")
    capfd.readouterr()
    # SIGTERM to the launcher before the growth event: it forwards it, the ranks agree on a step
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # should it land after the run, it does no harm
    try:
        sender = sigterm_to_this_launcher(run, growth // 2)
        assert main([*GROW, "--nproc", "2", "--out", str(run), "--quiet"]) == 143
        sender.join(TIMEOUT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"interrupted by SIGTERM; checkpoint {run / CHECKPOINTS / load_checkpoint(run).directory.name} "
                   f"written; resume with: graphgrow grow --resume {run} --nproc 2"]
    stopped = load_checkpoint(run)
    assert stopped.meta["world"] == 2 and stopped.meta["step"] < records[growth]["iteration"]
    assert read_records(run)[-1]["event"] == "interrupted" and len(stopped.state["torch_rng_ranks"]) == 2
    shutil.copytree(run, tmp_path / "in-one-process")
    # SIGKILL to the launcher after the growth event: its ranks die with it, the checkpoint stays
    launcher = subprocess.Popen(command("grow", "--resume", str(run), "--nproc", "2"), cwd=ROOT, env=environment(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(run, growth + 4, [launcher])
    workers = children(launcher.pid)
    assert len(workers) == 2
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30
    while any(alive(w) for w in workers):
        assert time.monotonic() < deadline, "the ranks outlived their launcher"
        time.sleep(0.05)
    assert load_checkpoint(run).meta["step"] >= records[growth]["iteration"]  # the grown network was saved
    assert main(["grow", "--resume", str(run), "--nproc", "2", "--quiet"]) == 0
    assert_same_run(run, reference)
    # another process count continues the same global batches: equal up to the order of float sums
    assert main(["grow", "--resume", str(tmp_path / "in-one-process"), "--quiet"]) == 0
    expected = torch.load(reference / "final.pt", weights_only=True)
    got = torch.load(tmp_path / "in-one-process" / "final.pt", weights_only=True)
    assert list(got) == list(expected) and all((got[k] - expected[k]).abs().max() <= 1e-10 for k in expected)
    assert (tmp_path / "in-one-process" / "final.yaml").read_bytes() == (reference / "final.yaml").read_bytes()


def test_an_mgopt_run_stopped_through_one_rank_and_a_failed_write_stop_both_ranks_and_resume_bitwise(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main([*MGOPT, "--nproc", "2", "--out", str(reference), "--quiet"]) == 0
    records = read_records(reference)
    assert any(r.get("kind") == "cgc" for r in records)  # coarse corrections happen
    workers = ranks([*MGOPT, "--out", str(run)])
    wait_for(run, len(records) // 3, workers)
    workers[1].send_signal(signal.SIGTERM)  # one rank only, as a scheduler may do under torchrun
    (code0, err0), (code1, err1) = finish(workers)
    assert (code0, code1) == (143, 143), (err0, err1)
    stopped = load_checkpoint(run).meta["step"]
    assert err0.strip().splitlines() == [f"interrupted by SIGTERM; checkpoint {run / CHECKPOINTS / f'step-{stopped:06d}'} "
                                         f"written; resume with: graphgrow mgopt --resume {run} --nproc 2"]
    assert err1.strip() == ""
    # rank 0 cannot write the resumed run's next checkpoint (something is in the way of its
    # temporary directory): both ranks stop there, one error line, the previous checkpoint stays
    blocked = (stopped // 4 + 1) * 4
    obstacle = run / CHECKPOINTS / f".step-{blocked:06d}.partial"
    obstacle.write_text("in the way")
    (code0, err0), (code1, err1) = finish(ranks(["mgopt", "--resume", str(run)]))
    assert (code0, code1) == (2, 2)
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and f"cannot write checkpoint step-{blocked:06d}" in lines[0] and "hint:" in lines[0], err0
    assert err1.strip() == ""
    assert load_checkpoint(run).meta["step"] == stopped
    obstacle.unlink()
    assert main(["mgopt", "--resume", str(run), "--nproc", "2", "--quiet"]) == 0
    assert_same_run(run, reference)


def test_ranks_stop_at_the_signal_they_agree_on():
    flags = [InterruptFlag() for _ in range(3)]
    for flag in flags:
        flag.shared = True
    flags[2].received = signal.SIGTERM
    assert [f.signum for f in flags] == [None] * 3  # received, but not agreed yet
    flags[0].received = signal.SIGINT
    summed = [sum(votes) for votes in zip(*(f.vote() for f in flags))]
    for flag in flags:
        flag.settle(summed)
    assert [f.signum for f in flags] == [signal.SIGTERM] * 3  # SIGTERM wins over SIGINT
    flags[1].settle([1.0, 0.0])
    assert flags[1].signum == signal.SIGTERM  # the first agreement stands
    alone = InterruptFlag()
    alone.received = signal.SIGINT
    assert alone.signum == signal.SIGINT


def test_each_rank_takes_back_its_own_random_state_and_another_process_count_rank_zeros():
    from graphgrow.runtime.checkpoint import restore_torch_rng
    from graphgrow.runtime.distributed import DataParallel
    states = [torch.Generator().manual_seed(seed).get_state() for seed in (1, 2)]
    saved = {"torch_rng": states[0], "torch_rng_ranks": states}
    before = torch.get_rng_state()
    try:
        for rank, world, expected in ((1, 2, 1), (0, 2, 0), (2, 3, 0), (0, 1, 0)):
            restore_torch_rng(saved, DataParallel(rank, world, torch.device("cpu")))
            assert torch.equal(torch.get_rng_state(), states[expected]), (rank, world)
        restore_torch_rng({"torch_rng": states[1]})  # one process, a checkpoint of one process
        assert torch.equal(torch.get_rng_state(), states[1])
    finally:
        torch.set_rng_state(before)
