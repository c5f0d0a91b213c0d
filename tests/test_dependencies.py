"""Every import of the package is declared in pyproject.toml: a fresh `pip install .` must be
able to import every module. Every import statement counts, also those inside functions; the
standard library and the package's own modules need no declaration. The tests may also use the
`test` extra."""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("graphgrow", "passes")

#: distributions whose import name is not their normalised distribution name
IMPORT_NAMES = {"pyyaml": "yaml", "backpack-for-pytorch": "backpack"}


def declared(section: str) -> set[str]:
    """Import names of the requirements in one list of pyproject.toml (``dependencies`` or an
    optional-dependencies extra). A regex rather than tomllib, which needs Python 3.11."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    found = re.search(rf"^{re.escape(section)} = \[(.*?)\]", text, re.S | re.M)
    assert found, f"pyproject.toml has no '{section} = [...]' list"
    names = set()
    for requirement in re.findall(r'"([^"]+)"', found.group(1)):
        distribution = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")
        names.add(IMPORT_NAMES.get(distribution, distribution.replace("-", "_")))
    return names


def top_level_imports(path: Path) -> set[str]:
    """The top-level names of every absolute import in a file (relative imports are the package's)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def undeclared(paths, allowed: set[str]) -> list[str]:
    known = allowed | set(sys.stdlib_module_names) | set(PACKAGES)
    return sorted(f"{path} imports {name}"
                  for path in paths for name in top_level_imports(path) if name not in known)


def test_every_package_import_is_declared():
    paths = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(paths) > 40
    missing = undeclared(paths, declared("dependencies"))
    assert not missing, "declare these in pyproject.toml [project] dependencies:\n" + "\n".join(missing)


def test_every_test_import_is_declared():
    paths = sorted((ROOT / "tests").glob("*.py"))
    local = {p.stem for p in paths}  # conftest and helpers beside the tests
    missing = undeclared(paths, declared("dependencies") | declared("test") | local)
    assert not missing, "declare these in pyproject.toml (dependencies or the test extra):\n" + "\n".join(missing)


def test_the_checker_maps_distribution_names_and_flags_undeclared_imports(tmp_path):
    assert {"yaml", "backpack", "torch", "networkx", "numpy"} <= declared("dependencies")
    source = tmp_path / "module.py"
    source.write_text("import os, yaml\nfrom . import sibling\nfrom graphgrow.ir import x\n"
                      "def late():\n    from scipy.stats import special_ortho_group\n    import sklearn.linear_model\n")
    assert top_level_imports(source) == {"os", "yaml", "graphgrow", "scipy", "sklearn"}
    assert undeclared([source], declared("dependencies")) == [f"{source} imports scipy", f"{source} imports sklearn"]
