"""What a plain (non-editable) `pip install .` ships: the package, the shipped specs the demo
runs, and the version `graphgrow --version` prints."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import graphgrow
from graphgrow.cli.commands import DEMO_SPEC

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("graphgrow", "passes", "specs", "pyproject.toml", "README.md")


def test_a_built_wheel_holds_every_shipped_spec_and_the_version(tmp_path):
    """Build the wheel from a copy of the tree (so the build leaves nothing in the checkout)
    with the setuptools already installed, then read its contents."""
    tree = tmp_path / "tree"
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tree / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(tree)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    wheel, = (tmp_path / "dist").glob("graphgrow-*.whl")
    assert wheel.name.startswith(f"graphgrow-{graphgrow.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    specs = sorted(p.name for p in (ROOT / "specs").glob("*.yaml"))
    assert specs and all(f"graphgrow/specs/{name}" in names for name in specs)
    assert "graphgrow/cli/parser.py" in names and "passes/insert.py" in names
    assert DEMO_SPEC.relative_to(Path(graphgrow.__file__).parent).as_posix() == "specs/fnn_spiral.yaml"


def test_the_packaged_specs_are_the_repository_specs():
    packaged = Path(graphgrow.__file__).parent / "specs"
    assert packaged.resolve() == (ROOT / "specs").resolve()
    assert DEMO_SPEC.is_file()


def test_version_option(capsys):
    from graphgrow.cli import main
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"graphgrow {graphgrow.__version__}"
