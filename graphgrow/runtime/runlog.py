"""A run's record: events in memory and, when a run directory is given, a JSONL log on disk
plus the final network (YAML + weights), the exported model and a summary.

Layout of a run directory::

    RUNDIR/log.jsonl      one JSON object per line: every step, evaluation and event
    RUNDIR/summary.json   what the run produced (final metrics, insertions, FLOPs)
    RUNDIR/final.yaml     the final network's spec; RUNDIR/final.pt its weights
    RUNDIR/model.pt2      the final network exported with torch.export
    RUNDIR/*.png          plots (see graphgrow.plots)
    RUNDIR/checkpoints/   the last checkpoints (graphgrow.runtime.checkpoint)

Each log record is flushed as it is written (a killed run loses at most the record being
written); summary.json, final.yaml/.pt and model.pt2 are written under a temporary name and
renamed, so they are whole or absent.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

from ..compiler.io import ensure_directory
from ..errors import GraphgrowError
from .checkpoint import replace_atomically, sync_file, write_text_atomically

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
        # line-buffered: every record reaches the file as it is written
        return open(directory / LOG_NAME, "w" if overwrite else "x", encoding="utf-8", buffering=1)
    except FileExistsError:
        raise RunDirectoryTaken("run directory already holds a run", file=str(directory), option="out",
                                hint="choose a new --out directory or remove the old one") from None
    except OSError as err:
        raise GraphgrowError(f"cannot create the run log: {err.strerror or err}", file=str(directory),
                             option="out") from None


class RunLog:
    """Records events (dicts with an ``event`` key and a ``time`` in seconds since the start).

    ``directory=None`` keeps records in memory only (benchmarks, tests); otherwise each record
    is also appended to ``directory/log.jsonl`` as it happens. ``resume=N`` continues the
    run in ``directory``: its log is cut to its first N records (those of a checkpoint) and
    appended to, with times going on from the last kept record.
    """

    def __init__(self, directory: str | Path | None = None, *, overwrite: bool = False, resume: int | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.records: list[dict] = []
        self.start = time.perf_counter()
        self._file = None
        if self.directory is not None:
            if resume is not None:
                self._reopen(self.directory / LOG_NAME, resume)
            else:
                self._file = _create_log(self.directory, overwrite)

    def _reopen(self, log_path: Path, length: int) -> None:
        records = read_log(log_path, torn_tail=True)
        if any(r.get("event") == "end" for r in records):
            raise GraphgrowError("the run has finished; there is nothing to resume", file=str(self.directory),
                                 hint="its results are in summary.json and final.yaml")
        if len(records) < length:
            raise GraphgrowError(f"run log holds {len(records)} records, the checkpoint expects {length}",
                                 file=str(log_path), hint="the log does not belong to this checkpoint")
        self.records = records[:length]
        write_text_atomically(log_path, "".join(json.dumps(r) + "\n" for r in self.records))
        last_time = max((r.get("time") or 0.0 for r in self.records), default=0.0)
        self.start = time.perf_counter() - last_time
        self._file = open(log_path, "a", encoding="utf-8", buffering=1)

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
            write_text_atomically(target, json.dumps(_jsonable(value), indent=2) + "\n")
        return target

    def save_network(self, network, stem: str = FINAL_STEM) -> tuple[Path, Path] | None:
        """Write the network as ``stem.yaml`` + ``stem.pt`` (graphgrow.io.save)."""
        if self.directory is None:
            return None
        from ..compiler.io import save, weights_path
        spec = self.directory / f"{stem}.yaml"
        partial = save(network, self.directory / f".{stem}.partial.yaml")
        try:
            for path in partial:
                sync_file(path)
            os.replace(partial[1], weights_path(spec))
            os.replace(partial[0], spec)
        finally:
            for path in partial:
                path.unlink(missing_ok=True)
        return spec, weights_path(spec)

    def export(self, network, name: str = EXPORT_NAME) -> Path | None:
        """Write the network exported with torch.export (graphgrow.export)."""
        if self.directory is None:
            return None
        from ..compiler.export import export
        return replace_atomically(self.directory / name,
                                  lambda temporary: export(network.module, network.graph, temporary, "export"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_log(path: str | Path, *, torn_tail: bool = False) -> list[dict]:
    """The records of a run directory's ``log.jsonl`` (or of the file itself). ``torn_tail``:
    leave out a last line cut short (a run killed while writing it)."""
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
                    if torn_tail and not line.endswith("\n"):
                        break
                    raise GraphgrowError(f"bad JSON in run log: {err.msg}", file=str(path), line=number) from None
    return records


def select(records: Iterable[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("event") == kind]
