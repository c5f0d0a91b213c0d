"""Every bad input is one clear error: through the command line, each case below prints one
line naming the file or option, exits with status 2, shows no traceback and leaves nothing
behind (no run directory, no artifact). The cases run in one fresh interpreter (the CLI's
``main`` per case, as ``python -m graphgrow`` calls it), so the table stays fast;
tests/test_cli.py runs a spec error through ``python -m graphgrow`` itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graphgrow.compiler.export import MAX_EXPORT_NODES
from graphgrow.runtime.runlog import RunDirectoryTaken, RunLog

ROOT = Path(__file__).resolve().parent.parent

TINY = "graphgrow: 1\nname: tiny\ninput: {shape: [2]}\nlayers:\n  - {name: fc, op: linear, out: 2}\n"
TINY_SPEC = str(ROOT / "specs" / "fnn_spiral.yaml")


def alias_bomb() -> str:
    """A few hundred bytes standing for 10^8 values: each alias level multiplies by ten."""
    lines = ["graphgrow: 1", "name: bomb", "input: {shape: [2]}", "layers:",
             "  - {name: fc, op: linear, out: 2, extra: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]}"]
    for level in range(1, 8):
        lines.append(f"  - {{name: fc{level}, op: linear, out: 2, extra: &a{level} [{', '.join([f'*a{level - 1}'] * 10)}]}}")
    return "\n".join(lines) + "\n"


def write_inputs(d: Path) -> None:
    (d / "tiny.yaml").write_text(TINY)
    (d / "bomb.yaml").write_text(alias_bomb())
    (d / "nfkc.yaml").write_text(TINY + "  - {name: ＦＣ, op: linear, out: 2}\n")
    (d / "accent.yaml").write_text(TINY.replace("name: fc", "name: café"))
    (d / "huge.yaml").write_text(TINY.replace("[2]", "[100000]").replace("out: 2", "out: 100000000"))
    depth = MAX_EXPORT_NODES["torchscript"] + 1
    (d / "deep.yaml").write_text(TINY + f"  - repeat: {depth}\n    layers:\n      - {{name: r${{i}}, op: relu}}\n")
    (d / "afile").write_text("a file, not a folder")
    f32 = np.float32

    def data(name, **arrays):
        base = dict(x_train=np.zeros((4, 2), f32), y_train=np.array([0, 1, 0, 1]),
                    x_test=np.zeros((2, 2), f32), y_test=np.array([0, 1]))
        np.savez(d / name, **{**base, **arrays})
    data("range.npz", y_test=np.array([0, 7]))
    data("floats.npz", y_train=np.array([0, 1, 0, 1], f32), y_test=np.array([0, 1], f32))
    data("empty.npz", x_train=np.zeros((0, 2), f32), y_train=np.zeros(0, np.int64))
    data("nan.npz", x_train=np.array([[0, 0], [1, 1], [np.nan, 0], [0, 0]], f32))
    data("inf.npz", x_test=np.array([[0, 0], [np.inf, 0]], f32))
    whole = (d / "range.npz").read_bytes()
    (d / "corrupt.npz").write_bytes(whole[:len(whole) // 2])
    torch.save({"fc.weight": torch.full((2, 2), float("nan")), "fc.bias": torch.zeros(2)}, d / "nan.pt")


def unwritable(d: Path) -> str:
    """A folder nobody may create things in (root ignores permission bits; /sys refuses root too)."""
    if os.geteuid() == 0:
        return "/sys/graphgrow-test"
    locked = d / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return str(locked)


GROW = ["grow", "{d}/tiny.yaml", "--epochs", "4", "--quiet"]

#: (case, argv ({d}: the folder with the inputs, {run}: a run directory that must not appear),
#:  the start of the error line, a phrase it must hold)
CASES = [
    ("alias bomb", ["check", "{d}/bomb.yaml"], "{d}/bomb.yaml:", "expands to"),
    ("NFKC-colliding name", ["check", "{d}/nfkc.yaml"], "{d}/nfkc.yaml:6:", "invalid node name 'ＦＣ'"),
    ("non-ASCII name", ["check", "{d}/accent.yaml"], "{d}/accent.yaml:5:", "ASCII identifiers"),
    ("label out of range", GROW + ["--data", "npz:{d}/range.npz", "--out", "{run}"], "--data:",
     "y_test holds label 7, outside 0..1"),
    ("float labels", GROW + ["--data", "npz:{d}/floats.npz", "--out", "{run}"], "--data:", "integer class labels"),
    ("empty arrays", GROW + ["--data", "npz:{d}/empty.npz", "--out", "{run}"], "--data:", "training split is empty"),
    ("corrupt npz", GROW + ["--data", "npz:{d}/corrupt.npz", "--out", "{run}"], "{d}/corrupt.npz:", "cannot read .npz"),
    ("NaN in data", GROW + ["--data", "npz:{d}/nan.npz", "--out", "{run}"], "--data:", "x_train holds NaN or infinite"),
    ("inf in data", ["mgopt", "{d}/tiny.yaml", "--data", "npz:{d}/inf.npz", "--out", "{run}"], "--data:",
     "x_test holds NaN or infinite"),
    ("out under a file", GROW + ["--out", "{d}/afile/run"], "{d}/afile/run:", "{d}/afile is a file"),
    ("out unwritable", GROW + ["--out", "{locked}/run"], "{locked}/run:", "cannot create the run directory"),
    ("compile under a file", ["compile", "{d}/tiny.yaml", "-o", "{d}/afile/m.pt2"], "{d}/afile:", "is a file"),
    ("compile extension", ["compile", "{d}/tiny.yaml", "-o", "{d}/m.onnx"], "{d}/m.onnx:", "writes .pt2 files"),
    ("torchscript extension", ["compile", "{d}/tiny.yaml", "-o", "{d}/m.pt2", "--format", "torchscript"],
     "{d}/m.pt2:", "writes .pt files"),
    ("too large to allocate", ["compile", "{d}/huge.yaml", "-o", "{d}/huge.pt2"], "{d}/huge.yaml:", "is too large"),
    ("NaN weights", ["compile", "{d}/tiny.yaml", "-o", "{d}/w.pt2", "--weights", "{d}/nan.pt"], "{d}/nan.pt:",
     "weight 'fc.weight' holds NaN"),
    ("too deep to export", ["compile", "{d}/deep.yaml", "-o", "{d}/deep.pt", "--format", "torchscript"],
     "{d}/deep.yaml:", "more than torchscript export handles"),
    ("insert-at beyond epochs", GROW + ["--insert-at", "9", "--out", "{run}"], "--insert-at:", "not before the last epoch"),
    ("insert-at negative", GROW + ["--insert-at", "-1", "--out", "{run}"], "--insert-at:", "positive integers"),
    ("max-insertions -1", GROW + ["--max-insertions", "-1", "--out", "{run}"], "--max-insertions:", "non-negative"),
    ("widen -2", GROW + ["--widen", "-2", "--out", "{run}"], "--widen:", "non-negative"),
    ("insert-at with insert-every", GROW + ["--insert-at", "2", "--insert-every", "2", "--out", "{run}"],
     "--insert-at:", "cannot be combined"),
    ("bad learning rate", GROW + ["--lr", "-1", "--out", "{run}"], "--lr:", "must be positive"),
    ("mgopt learning rate", ["mgopt", "{d}/tiny.yaml", "--lr", "0", "--out", "{run}"], "--lr:", "positive number"),
    ("unknown data source", GROW + ["--data", "cifar", "--out", "{run}"], "--data:", "unknown data source"),
    ("sensitivities without weights", ["sensitivities", "{d}/tiny.yaml"], "--weights:", "--random-weights"),
    ("not a number", GROW + ["--epochs", "many"], "graphgrow grow: error:", "invalid int value"),
]

DRIVER = """
import contextlib, io, json, sys, traceback
from graphgrow.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
        except BaseException:  # at the command line this would be a traceback
            code = "raised"
            traceback.print_exc(file=err)
    results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
print(json.dumps(results))
"""


def fill(text: str, places: dict) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    write_inputs(d)
    locked = unwritable(d)
    before = sorted(p.relative_to(d) for p in d.rglob("*"))
    runs = {case: str(d / "runs" / f"run{index}") for index, (case, *_) in enumerate(CASES)}
    argvs = [[fill(a, {"d": str(d), "locked": locked, "run": runs[case]}) for a in argv] for case, argv, *_ in CASES]
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    after = sorted(p.relative_to(d) for p in d.rglob("*"))
    results = dict(zip((c[0] for c in CASES), json.loads(done.stdout.strip().splitlines()[-1])))
    return {"d": str(d), "locked": locked, "results": results, "before": before, "after": after}


@pytest.mark.parametrize("case,argv,start,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(outcomes, case, argv, start, phrase):
    result = outcomes["results"][case]
    places = {"d": outcomes["d"], "locked": outcomes["locked"]}
    lines = result["stderr"].strip().splitlines()
    assert result["code"] == 2, result["stderr"]
    assert "Traceback" not in result["stderr"] and len(lines) == 1, result["stderr"]
    assert lines[0].startswith(fill(start, places)) and " error: " in lines[0] + " ", lines[0]
    assert fill(phrase, places) in lines[0], lines[0]


def test_bad_inputs_leave_nothing_behind(outcomes):
    assert outcomes["after"] == outcomes["before"]


def test_a_run_directory_is_created_exclusively(tmp_path):
    """The check for an existing run and the creation of its log are one step."""
    with RunLog(tmp_path / "run"):
        with pytest.raises(RunDirectoryTaken, match="already holds a run"):
            RunLog(tmp_path / "run")


def test_two_demos_in_the_same_second_get_two_run_directories(tmp_path, monkeypatch, capsys):
    import time

    from graphgrow.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda pattern, *args: "runs/demo-same-second")
    for _ in range(2):
        assert main(["demo", "--epochs", "3", "--insert-at", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["demo-same-second", "demo-same-second-2"]
    assert all((tmp_path / "runs" / name / "log.jsonl").exists() for name in ("demo-same-second", "demo-same-second-2"))


def test_help_shows_defaults_and_the_mnist_split(capsys):
    from graphgrow.cli import main
    with pytest.raises(SystemExit):
        main(["grow", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100)" in text and "(default: 0.1)" in text and "(default: sgd)" in text
    assert "8,000 train / 2,000 test" in text
    assert "when neither this nor --insert-at is given: every epochs // (max-" in text  # argparse wraps at '-' 


def test_python_api_errors_name_the_argument(tmp_path):
    from graphgrow import GraphgrowError
    from graphgrow.sensli import grow
    with pytest.raises(GraphgrowError) as caught:
        grow(TINY_SPEC, "spiral", insert_at=[5], epochs=5, out=tmp_path / "run")
    assert caught.value.option == "insert_at" and str(caught.value).startswith("insert_at: error:")
    assert not (tmp_path / "run").exists()


def test_repeat_blocks_count_the_values_they_copy(monkeypatch):
    """A repeat of a layer with a long argument expands past MAX_VALUES even though the layer
    count stays under MAX_EXPANSION: refused at the repeated layer, before the copies pile up.
    (The budget is lowered to keep the test fast; the text itself stays under it.)"""
    from graphgrow import GraphgrowError, graph_from_text
    from graphgrow import spec
    monkeypatch.setattr(spec, "MAX_VALUES", 20_000)
    count = spec.MAX_VALUES // 1000 + 1
    assert count < spec.MAX_EXPANSION
    text = (TINY + f"  - repeat: {count}\n    layers:\n"
            f"      - {{name: c${{i}}, op: linear, out: 2, extra: [{', '.join(['1'] * 1000)}]}}\n")
    with pytest.raises(GraphgrowError, match="expands to more than") as caught:
        graph_from_text(text, "rep.yaml")
    assert (caught.value.file, caught.value.line) == ("rep.yaml", 8)


def test_regression_targets_must_match_the_output_size():
    from types import SimpleNamespace

    from graphgrow import GraphgrowError, Network, graph_from_text
    from graphgrow.runtime.splits import as_splits, check_data_fits
    network = Network.build(graph_from_text(TINY))
    data = SimpleNamespace(x_train=torch.zeros(3, 2), y_train=torch.zeros(3, 5))
    with pytest.raises(GraphgrowError, match=r"y_train has shape \[5\] per sample"):
        check_data_fits(network, as_splits(data)[0], "mse")
    check_data_fits(network, as_splits(SimpleNamespace(x_train=torch.zeros(3, 2), y_train=torch.zeros(3, 2)))[0], "mse")


def test_sensitivities_with_random_weights_scores_a_fresh_network(capsys):
    from graphgrow.cli import main
    assert main(["sensitivities", TINY_SPEC, "--random-weights", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["candidates"] and all(c["merit"] >= 0 for c in report["candidates"])
