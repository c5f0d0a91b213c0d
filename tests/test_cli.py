"""The command line: commands work, user mistakes print one located line and exit 2."""
import argparse
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from graphgrow.cli import main

ROOT = Path(__file__).resolve().parent.parent
FNN = str(ROOT / "specs" / "fnn_spiral.yaml")


def test_check_table_and_json(capsys):
    assert main(["check", FNN]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["check", FNN, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total_params"] == 27 and [n["name"] for n in summary["nodes"]] == ["fc1", "act1", "head"]


def test_show_code_and_dot(capsys):
    assert main(["show", FNN, "--code"]) == 0
    code = capsys.readouterr().out
    assert "def forward" in code and "self.fc1" in code
    assert main(["show", FNN, "--dot"]) == 0
    assert "fc1 -> act1;" in capsys.readouterr().out
    assert main(["show", FNN]) == 0
    assert "graphgrow: 1" in capsys.readouterr().out


@pytest.mark.parametrize("fmt,suffix", [("export", ".pt2"), ("torchscript", ".pt")])
def test_compile_writes_artifact(tmp_path, fmt, suffix, capsys):
    out = tmp_path / "model"
    assert main(["compile", FNN, "-o", str(out), "--format", fmt, "--seed", "4"]) == 0
    assert (tmp_path / f"model{suffix}").exists()
    assert "max |diff| = 0.0e+00" in capsys.readouterr().out


def test_spec_error_is_one_located_line_and_status_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("graphgrow: 1\nname: x\ninput: {shape: [2]}\nlayers:\n  - {name: a, op: linaer, out: 3}\n")
    result = subprocess.run([sys.executable, "-m", "graphgrow", "check", str(bad)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{bad}:5:19: error: unknown op 'linaer'")
    assert "did you mean 'linear'?" in lines[0] and "Traceback" not in result.stderr


def test_missing_spec_file(capsys):
    assert main(["check", "no/such/spec.yaml"]) == 2
    assert "spec file not found" in capsys.readouterr().err


def test_weights_that_do_not_fit(tmp_path, capsys):
    import torch
    weights = tmp_path / "w.pt"
    torch.save({"fc1.weight": torch.zeros(3, 3)}, weights)
    assert main(["compile", FNN, "-o", str(tmp_path / "m.pt2"), "--weights", str(weights)]) == 2
    assert "weights do not fit" in capsys.readouterr().err


def test_demo_grows_and_writes_the_run(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--spec", FNN, "--out", str(out), "--epochs", "40", "--insert-at", "20"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 20: inserted at" in printed and "before" in printed and "after" in printed
    for name in ("log.jsonl", "summary.json", "final.yaml", "final.pt", "model.pt2", "curves.png"):
        assert (out / name).exists(), name


def test_grow_and_sensitivities_commands(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["grow", FNN, "--epochs", "6", "--insert-at", "3", "--lr", "0.2", "--out", str(out),
                 "--quiet"]) == 0
    assert "epoch 3: inserted at" in capsys.readouterr().out
    assert main(["sensitivities", str(out / "final.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["candidates"] and all(c["merit"] >= 0 for c in report["candidates"])


def test_grow_with_the_frobenius_optimizer(tmp_path, capsys):
    """SensLI with the layer-wise preconditioner: the preconditioner follows the inserted layer."""
    out = tmp_path / "run"
    assert main(["grow", FNN, "--epochs", "6", "--insert-at", "3", "--lr", "0.05", "--optimizer", "frobenius",
                 "--damping", "0.1", "--out", str(out), "--quiet"]) == 0
    assert "epoch 3: inserted at" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["optimizer"] == "frobenius" and summary["config"]["damping"] == 0.1
    assert math.isfinite(summary["final"]["train"]["loss"])


def test_grow_by_data_driven_neurons(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["grow", FNN, "--epochs", "4", "--insert-at", "2", "--lr", "0.2", "--widen", "2",
                 "--neurons", "gradmax", "--out", str(out), "--quiet"]) == 0
    assert "epoch 2: inserted at fc1" in capsys.readouterr().out
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (widening,) = [e for e in events if e["event"] == "widening"]
    # fc1 reads 2 inputs: 2 singular directions (4 signed candidates), the other 4 candidates random
    assert "gradmax" in [n["init"] for n in widening["neurons"]] and len(widening["neurons"]) == 2
    assert widening["loss_after"] == pytest.approx(widening["loss_before"], abs=1e-6)
    with pytest.raises(SystemExit) as stopped:  # argparse refuses an unknown choice with status 2
        main(["grow", FNN, "--epochs", "2", "--widen", "1", "--neurons", "smart"])
    assert stopped.value.code == 2


def test_engine_errors_are_one_line(capsys):
    assert main(["grow", FNN, "--strategy", "best", "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown strategy 'best'" in err[0]


def test_mgopt_command(capsys):
    assert main(["mgopt", str(ROOT / "specs" / "resnet_ode.yaml"), "--epochs", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mgopt on a depth hierarchy" in printed and "coarse corrections" in printed


def _mgopt_parser():
    from graphgrow.cli import build_parser
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["mgopt"]


def test_mgopt_cli_and_run_have_the_same_options_and_defaults():
    """Every parameter of graphgrow.mgopt.run is an option of `graphgrow mgopt` with the same
    default, and every option but the launcher's (--nproc) is a parameter of run()."""
    from graphgrow.cli import build_parser
    from graphgrow.cli.commands import LAUNCH_OPTIONS, MGOPT_NEGATED, MGOPT_RENAMED
    from graphgrow.mgopt import run
    parameters = inspect.signature(run).parameters
    opts = build_parser().parse_args(["mgopt", "net.yaml"])
    dests = {a.dest for a in _mgopt_parser()._actions if a.dest != "help"} - LAUNCH_OPTIONS
    to_parameter = {MGOPT_RENAMED.get(p, MGOPT_NEGATED.get(p, p)): p for p in parameters}
    assert dests == set(to_parameter), "options without a run() parameter or the other way round"
    for dest, name in to_parameter.items():
        default = parameters[name].default
        if name == "spec":
            continue  # positional, no default
        if name == "progress":  # display only: the command shows a bar (--quiet), a library call does not
            assert opts.quiet is False and default is False
            continue
        if name == "device":  # the command picks a GPU where present; a library call leaves the network where it is
            assert opts.device == "auto" and default is None
            continue
        if name in MGOPT_NEGATED:
            assert getattr(opts, dest) is (not default), name
        else:
            assert getattr(opts, dest) == default, f"--{dest}: {getattr(opts, dest)!r} vs run(): {default!r}"
    assert opts.batch == 100 and opts.K == 10  # the defaults the issue found to differ


def test_mgopt_cli_passes_every_option_to_run(tmp_path, capsys):
    """The anchor's set-up from the command line: injection, a V-cycle every iteration, the same
    batch on all levels, momentum, a work budget; --no-export skips model.pt2; the final line
    gives the accuracy."""
    out = tmp_path / "run"
    assert main(["mgopt", str(ROOT / "specs" / "resnet_ode.yaml"), "--levels", "3", "--restriction", "injection",
                 "--min-gap", "0", "--kappa", "0", "--same-batch", "--momentum", "0.5", "--K", "2",
                 "--work-budget", "30", "--evals-per-epoch", "2", "--no-log-steps", "--epochs", "3",
                 "--out", str(out), "--no-export", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed.splitlines()[-2]  # the final line, before the run directory
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    assert (config["min_gap"], config["same_batch"], config["momentum"], config["K"]) == (0, True, 0.5, 2)
    assert summary["final"]["work"] >= 30 and summary["final"]["corrections"] == summary["final"]["iterations"]
    assert not (out / "model.pt2").exists() and (out / "final.pt").exists()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["event"] == "step"]
    assert main(["mgopt", str(ROOT / "specs" / "resnet_ode.yaml"), "--levels", "3", "--variant", "nested",
                 "--nested-epochs", "1", "2", "3", "--epochs", "1", "--quiet"]) == 2
    assert "nested_epochs has 3 counts for 2 coarse levels" in capsys.readouterr().err


def test_grow_no_export_and_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["grow", FNN, "--epochs", "4", "--insert-at", "2", "--out", str(out), "--no-export", "--quiet"]) == 0
    final = [line for line in capsys.readouterr().out.splitlines() if line.startswith("final:")][0]
    assert "accuracy" in final and "train loss" in final
    assert not (out / "model.pt2").exists() and (out / "final.yaml").exists()
    assert main(["grow", FNN, "--epochs", "2", "--loss", "mse", "--strategy", "none", "--quiet"]) == 0
    final = [line for line in capsys.readouterr().out.splitlines() if line.startswith("final:")][0]
    assert "accuracy" not in final and "train loss" in final
