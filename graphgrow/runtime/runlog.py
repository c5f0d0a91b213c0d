"""A run's record: events in memory and, when a run directory is given, a JSONL log on disk
plus the final network (YAML + weights), the exported model and a summary.

Layout of a run directory::

    RUNDIR/log.jsonl      one JSON object per line: every step, evaluation and event
    RUNDIR/summary.json   what the run produced (final metrics, insertions, FLOPs)
    RUNDIR/final.yaml     the final network's spec; RUNDIR/final.pt its weights
    RUNDIR/model.pt2      the final network exported with torch.export
    RUNDIR/*.png          plots (see graphgrow.plots)
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

from ..compiler.io import ensure_directory
from ..errors import GraphgrowError

LOG_NAME = "log.jsonl"
SUMMARY_NAME = "summary.json"
FINAL_STEM = "final"
EXPORT_NAME = "model.pt2"


def _jsonable(value: Any) -> Any:
    """Plain JSON values; non-finite floats become None so every line stays valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


class RunDirectoryTaken(GraphgrowError):
    """The run directory already holds a run (another run may have created it a moment ago)."""


def _create_log(directory: Path, overwrite: bool):
    """Create the run directory (and its parents) and open its log. Without ``overwrite`` the
    log is created exclusively: the check for an existing run and the creation are one step,
    so two runs started at once never share a directory."""
    ensure_directory(directory, option="out", what="run directory")
    try:
        return open(directory / LOG_NAME, "w" if overwrite else "x", encoding="utf-8")
    except FileExistsError:
        raise RunDirectoryTaken("run directory already holds a run", file=str(directory), option="out",
                                hint="choose a new --out directory or remove the old one") from None
    except OSError as err:
        raise GraphgrowError(f"cannot create the run log: {err.strerror or err}", file=str(directory),
                             option="out") from None


class RunLog:
    """Records events (dicts with an ``event`` key and a ``time`` in seconds since the start).

    ``directory=None`` keeps records in memory only (benchmarks, tests); otherwise each record
    is also appended to ``directory/log.jsonl`` as it happens.
    """

    def __init__(self, directory: str | Path | None = None, *, overwrite: bool = False):
        self.directory = Path(directory) if directory is not None else None
        self.records: list[dict] = []
        self.start = time.perf_counter()
        self._file = None
        if self.directory is not None:
            self._file = _create_log(self.directory, overwrite)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, event: str, **fields: Any) -> dict:
        record = {"event": event, "time": self.elapsed(), **fields}
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(_jsonable(record)) + "\n")
        return record

    def events(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["event"] == kind]

    def path(self, name: str) -> Path | None:
        return None if self.directory is None else self.directory / name

    def write_json(self, name: str, value: Any) -> Path | None:
        target = self.path(name)
        if target is not None:
            target.write_text(json.dumps(_jsonable(value), indent=2) + "\n", encoding="utf-8")
        return target

    def save_network(self, network, stem: str = FINAL_STEM) -> tuple[Path, Path] | None:
        """Write the network as ``stem.yaml`` + ``stem.pt`` (graphgrow.io.save)."""
        if self.directory is None:
            return None
        from ..compiler.io import save
        return save(network, self.directory / f"{stem}.yaml")

    def export(self, network, name: str = EXPORT_NAME) -> Path | None:
        """Write the network exported with torch.export (graphgrow.export)."""
        if self.directory is None:
            return None
        from ..compiler.export import export
        return export(network.module, network.graph, self.directory / name, "export")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_log(path: str | Path) -> list[dict]:
    """The records of a run directory's ``log.jsonl`` (or of the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_NAME
    if not path.exists():
        raise GraphgrowError("run log not found", file=str(path), hint="is this a run directory?")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise GraphgrowError(f"bad JSON in run log: {err.msg}", file=str(path), line=number) from None
    return records


def select(records: Iterable[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("event") == kind]
