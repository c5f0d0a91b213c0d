"""Shared fixtures: the shipped specs and a helper that writes small spec texts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The suite's networks are small: one intra-op thread is faster for them, and on a shared
# 2-core machine (CI) torch's default threads oversubscribe the cores many times over.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = ROOT / "specs"


def make_spec_text(layers: list[str] | str, shape=(2,), name: str = "net", extra: str = "") -> str:
    """Spec text (format 1) with the given layer lines (each a YAML flow mapping or block)."""
    if isinstance(layers, str):
        layers = [layers]
    body = "".join(f"  - {layer}\n" for layer in layers)
    return (f"graphgrow: 1\nname: {name}\ninput: {{shape: {list(shape)}}}\n{extra}"
            f"layers:\n{body}")


@pytest.fixture
def specs_dir() -> Path:
    return SPECS_DIR


@pytest.fixture
def make_spec():
    """``make_spec(layers, shape=(2,), name='net', extra='')`` -> spec text; layer i is on
    line 5 + i when ``extra`` is empty."""
    return make_spec_text
