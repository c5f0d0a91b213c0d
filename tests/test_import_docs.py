"""docs/importing.md lists every torch module type, function and tensor method that a shipped
op imports."""
from __future__ import annotations

from pathlib import Path

from graphgrow.ops import registered_ops

DOCS = (Path(__file__).resolve().parent.parent / "docs" / "importing.md").read_text()
OPERATORS = {"add": "`+`", "mul": "`*`", "eq": "`==`", "getitem": "`x[:"}


def _spelled(target) -> str:
    """How the docs write a claimed module type or function."""
    module, name = target.__module__, target.__name__
    if isinstance(target, type):
        return f"`nn.{name}`" if module.startswith("torch.nn") else f"`{module}.{name}`"
    if module == "_operator":
        return OPERATORS[name]
    if module in ("torch.nn.functional", "torch._C._nn"):
        return f"`F.{name}`"
    return f"`torch.{name}`"


def test_every_imported_module_function_and_method_is_listed():
    shipped = [op for op in registered_ops().values() if type(op).__module__.startswith("graphgrow.ops")]
    claimed = {_spelled(t) for op in shipped for t in (*op.imports_modules, *op.imports_functions)}
    claimed |= {f"`.{method}`" for op in shipped for method in op.imports_methods}
    missing = sorted(c for c in claimed if c not in DOCS)
    assert not missing, f"not in docs/importing.md: {missing}"
    assert len(claimed) > 50
