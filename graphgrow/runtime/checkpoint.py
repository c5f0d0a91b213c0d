"""Checkpoints of a run and resuming from them.

A checkpoint is one directory ``RUNDIR/checkpoints/step-000450/`` (450 = optimizer steps taken):

* ``network.yaml``: the spec of the architecture at that step (it changes as a run grows),
* ``state.pt``: plain tensors and dicts, loaded with ``torch.load(weights_only=True)``: the
  weights and buffers, the engine's state (optimizer state keyed by parameter name, the position
  inside the epoch, every random generator, the growth schedule, the FLOP ledger, ...), the torch
  global RNG and the length the run's log had,
* ``checkpoint.json``: versions, the run's options and the SHA-256 of the two files above.

It is written under a temporary name and renamed, then ``checkpoints/LATEST`` (the name of the
newest checkpoint) is replaced atomically; the last ``KEEP`` checkpoints stay. A reader tries
``LATEST`` first and falls back to older ones when a checkpoint is incomplete or its checksums
do not match.

Engines hand their state over as a dict (``state_dict()`` on the trainer and on hooks) and get
it back through ``load_state_dict``; this module never imports an engine.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import platform
import shutil
import signal
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from ..compiler.io import dump
from ..compiler.network import Network
from ..errors import GraphgrowError
from .devices import resolve_device
from .interrupts import InterruptFlag, RunInterrupted, resume_command
from ..ir import LayerGraph, graph_from_text

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
KEEP = 2
FORMAT = 1
SPEC_NAME, STATE_NAME, META_NAME = "network.yaml", "state.pt", "checkpoint.json"
PREFIX = "step-"


# -- atomic files -----------------------------------------------------------------------------

def _fsync_directory(directory: Path) -> None:
    if os.name == "posix":
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def sync_file(path: Path) -> None:
    """Flush a written file to disk (before it is renamed into place)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def replace_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary path)`` beside ``path``, flush it to disk and rename it to
    ``path``: a reader sees the old file or the new one, never a torn one. The temporary name
    keeps the suffix (exporters check it)."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(temporary)
        sync_file(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return replace_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict:
    try:
        graphgrow = metadata.version("graphgrow")
    except metadata.PackageNotFoundError:
        graphgrow = None
    return {"graphgrow": graphgrow, "torch": torch.__version__, "python": platform.python_version()}


# -- writing and reading ----------------------------------------------------------------------

def _step_of(directory: Path) -> int:
    return int(directory.name[len(PREFIX):])


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Complete (renamed) checkpoint directories, newest first."""
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=_step_of, reverse=True)


def write_checkpoint(rundir: str | Path, step: int, graph: LayerGraph, state: dict, meta: dict,
                     keep: int = KEEP) -> Path:
    """Write checkpoint ``step`` of the run in ``rundir`` (see the module doc); returns its
    directory. A checkpoint of the same step (an epoch's end after a step checkpoint) is
    replaced."""
    root = Path(rundir) / CHECKPOINTS
    name = f"{PREFIX}{step:06d}"
    temporary = root / f".{name}.partial"
    try:
        return _write(root, name, temporary, step, graph, state, meta, keep)
    except OSError as err:  # a full disk, a directory made read-only: the previous checkpoint stays
        shutil.rmtree(temporary, ignore_errors=True)
        raise GraphgrowError(f"cannot write checkpoint {name}: {err.strerror or err}", file=str(root),
                             hint="the previous checkpoint is intact: make room and resume the run "
                                  "with --resume") from None


def _write(root: Path, name: str, temporary: Path, step: int, graph: LayerGraph, state: dict, meta: dict,
           keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    state_bytes = io.BytesIO()
    torch.save(state, state_bytes)
    contents = {SPEC_NAME: dump(graph).encode("utf-8"), STATE_NAME: state_bytes.getvalue()}
    meta = {"format": FORMAT, "step": step, **meta, "versions": versions(),
            "checksums": {file: hashlib.sha256(data).hexdigest() for file, data in contents.items()}}
    contents[META_NAME] = (json.dumps(meta, indent=1) + "\n").encode("utf-8")
    for file, data in contents.items():
        write_synced(temporary / file, data)
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    os.replace(temporary, target)
    _fsync_directory(root)
    write_text_atomically(root / LATEST, name + "\n")
    stale = _checkpoint_dirs(root)[keep:] + list(root.glob(f".{PREFIX}*.partial"))  # and writes cut short
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
    return target


@dataclass
class Checkpoint:
    """A checkpoint read back: its directory, the architecture, the state and the JSON meta;
    ``skipped`` names the newer checkpoints that could not be read, with the reason."""
    directory: Path
    graph: LayerGraph
    state: dict
    meta: dict
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def fingerprint(self) -> str:
        """Its name and its files' checksums: the ranks of a resumed data-parallel run compare
        them so that all continue from the same checkpoint."""
        return f"{self.directory.name} {json.dumps(self.meta['checksums'], sort_keys=True)}"


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """One checkpoint directory, verified against its checksums; a GraphgrowError if it is
    incomplete or damaged."""
    directory = Path(directory)
    meta_path = directory / META_NAME
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise GraphgrowError(f"unreadable checkpoint description: {err}", file=str(meta_path)) from None
    for name, expected in meta.get("checksums", {}).items():
        path = directory / name
        if not path.exists() or _sha256(path) != expected:
            raise GraphgrowError("checkpoint file does not match its checksum", file=str(path))
    if set(meta.get("checksums", {})) != {SPEC_NAME, STATE_NAME}:
        raise GraphgrowError("checkpoint description lacks checksums", file=str(meta_path))
    spec_path = directory / SPEC_NAME
    graph = graph_from_text(spec_path.read_text(encoding="utf-8"), str(spec_path))
    state = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)
    return Checkpoint(directory, graph, state, meta)


def load_checkpoint(rundir: str | Path) -> Checkpoint:
    """The newest readable checkpoint of ``rundir``: the one LATEST names, else the newest
    older one that reads back intact (``skipped`` says which were passed over and why)."""
    root = Path(rundir) / CHECKPOINTS
    if not root.is_dir():
        raise GraphgrowError("the run directory holds no checkpoint", file=str(rundir),
                             hint="checkpoints are written when a run has --out; start the run anew")
    candidates = _checkpoint_dirs(root)
    latest = root / LATEST
    if latest.exists():
        named = root / latest.read_text(encoding="utf-8").strip()
        candidates = [named] + [c for c in candidates if c != named]
    skipped = []
    for directory in candidates:
        try:
            checkpoint = read_checkpoint(directory)
        except GraphgrowError as err:
            skipped.append((directory.name, err.message))
            continue
        except Exception as err:  # torch.load and YAML raise many types for damaged files
            skipped.append((directory.name, f"{err.__class__.__name__}: {str(err)[:200]}"))
            continue
        checkpoint.skipped = skipped
        return checkpoint
    reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped) or "none found"
    raise GraphgrowError(f"no readable checkpoint ({reasons})", file=str(root),
                         hint="the run cannot be resumed; start it anew")


class Checkpointer:
    """Writes a run's checkpoints and turns a SIGINT/SIGTERM into a checkpoint and
    :class:`RunInterrupted` (install ``interrupt`` around the run). ``meta`` (the run's options)
    goes into every checkpoint.json.

    It is also a trainer hook (put it last): a checkpoint every ``every`` optimizer steps, or at
    the end of every epoch when ``every`` is None; always at the end of an epoch whose hooks
    replaced the network (a growth event). Engines without the trainer call ``due``, ``write``
    and ``stop_if_interrupted`` themselves.

    In a data-parallel run (``data_parallel``, runtime.distributed.DataParallel) every rank has
    one and calls it at the same points: the ranks stop at the signal they agreed on (see
    :class:`InterruptFlag`), rank 0 writes (``rundir`` is None on the others) while the others
    wait, and a failed write stops every rank with rank 0's error."""

    def __init__(self, rundir: str | Path | None, engine: str, meta: dict, *, every: int | None = None,
                 keep: int = KEEP, data_parallel=None):
        if every is not None and not (isinstance(every, int) and every >= 1):
            raise GraphgrowError(f"checkpoint_every must be a positive number of steps, got {every!r}",
                                 hint="leave it out to checkpoint at the end of every epoch")
        self.rundir, self.engine, self.meta, self.every, self.keep = rundir, engine, meta, every, keep
        self.interrupt = InterruptFlag()
        self.data_parallel = data_parallel
        if data_parallel is not None:
            self.interrupt.shared = True
            data_parallel.interrupt = self.interrupt
        self._saved_network = None

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def write(self, step: int, graph: LayerGraph, state: Callable[[], dict], **where: Any) -> Path:
        """Checkpoint ``step``: ``graph``, ``state()`` (made by the writing process only) and the
        torch global RNG (every rank's in a data-parallel run). Returns its directory."""
        parallel = self.data_parallel
        world = 1 if parallel is None else parallel.world
        generators = None if parallel is None else parallel.gathered(torch.get_rng_state())

        def attempt() -> Path:
            saved = {**state(), "torch_rng": torch.get_rng_state()}
            if generators is not None:
                saved["torch_rng_ranks"] = generators
            return write_checkpoint(self.rundir, step, graph, saved,
                                    {"engine": self.engine, "world": world, **where, **self.meta}, self.keep)
        return attempt() if parallel is None else parallel.on_rank_zero(f"writing checkpoint {step}", attempt)

    def stop_if_interrupted(self, log, save: Callable[[], Path], **where: Any) -> None:
        """After a signal: ``save()`` a checkpoint, log it and raise :class:`RunInterrupted`
        (call it before a regular checkpoint of the same point, which it then replaces)."""
        signum = self.interrupt.signum
        if signum is None:
            return
        written = save()
        log.log("interrupted", signal=signal.Signals(signum).name, checkpoint=written.name, **where)
        world = 1 if self.data_parallel is None else self.data_parallel.world
        raise RunInterrupted(signum, written, resume_command(self.engine, written.parent.parent, world))

    # -- as a trainer hook
    def on_train_start(self, trainer) -> None:
        self._saved_network = trainer.network

    def on_step_end(self, trainer, record) -> None:
        self._stop_if_interrupted(trainer)
        if self.due(trainer.iteration):
            self.save(trainer)

    def on_epoch_end(self, trainer) -> None:
        self._stop_if_interrupted(trainer)
        if self.every is None or trainer.network is not self._saved_network:
            self.save(trainer)

    def save(self, trainer) -> Path:
        def state() -> dict:
            return {"trainer": trainer.state_dict(),
                    "hooks": {key: hook.state_dict() for key, hook in stateful_hooks(trainer.hooks)},
                    "log_length": len(trainer.log.records)}
        self._saved_network = trainer.network
        return self.write(trainer.iteration, trainer.network.graph, state, epoch=trainer.epoch)

    def _stop_if_interrupted(self, trainer) -> None:
        self.stop_if_interrupted(trainer.log, lambda: self.save(trainer), epoch=trainer.epoch,
                                 iteration=trainer.iteration)


def stateful_hooks(hooks) -> list[tuple[str, Any]]:
    """(key, hook) for every hook with a state_dict, keyed by position and class."""
    return [(f"{i}:{type(h).__name__}", h) for i, h in enumerate(hooks) if hasattr(h, "state_dict")]


def restore_trainer(trainer, checkpoint: Checkpoint) -> None:
    """Put the trainer, its hooks and the torch global RNG back to the checkpoint's state (the
    trainer must be built on the checkpoint's network)."""
    state = checkpoint.state
    trainer.load_state_dict(state["trainer"])
    saved = state["hooks"]
    for key, hook in stateful_hooks(trainer.hooks):
        if key not in saved:
            raise GraphgrowError(f"the checkpoint holds no state for hook {key}", file=str(checkpoint.directory))
        hook.load_state_dict(saved[key])
    restore_torch_rng(state, trainer.data_parallel)


def restore_torch_rng(state: dict, data_parallel=None) -> None:
    """Put back the torch global RNG (dropout draws from it): each rank's own when a
    data-parallel run resumes with as many ranks as it had, else rank 0's (a dropout stream on
    other ranks then differs from the uninterrupted run's)."""
    ranks = state.get("torch_rng_ranks")
    if data_parallel is not None and ranks is not None and len(ranks) == data_parallel.world:
        torch.set_rng_state(ranks[data_parallel.rank])
    else:
        torch.set_rng_state(state["torch_rng"])


# -- the network of a resumed run -------------------------------------------------------------

def placement(network) -> dict:
    """Where and in which floating-point type a run's network lives, for its checkpoints."""
    return {"device": str(network.device), "dtype": str(network.dtype).removeprefix("torch.")}


def restored_network(checkpoint: Checkpoint, weights: dict) -> Network:
    """The checkpoint's architecture with ``weights`` (read onto the CPU), built on the device
    and in the dtype the run used (float64 weights keep their precision)."""
    where = checkpoint.meta["placement"]
    return Network.build(checkpoint.graph, weights, device=resolve_device(where["device"]),
                         dtype=getattr(torch, where["dtype"]))


def saved_options(options: dict) -> dict:
    """A run's options as checkpoint.json keeps them: data given as an object becomes None
    (it must be given again), a device or dtype object its name."""
    saved = dict(options)
    if not isinstance(saved.get("data"), str):
        saved["data"] = None
    for name in ("device", "dtype"):
        if isinstance(saved.get(name), (torch.device, torch.dtype)):
            saved[name] = str(saved[name]).removeprefix("torch.")
    return saved


# -- options of a resumed run -----------------------------------------------------------------

def resume_run(engine: str, function: Callable, options: dict, spec, out, rundir) -> tuple[Checkpoint, dict]:
    """The latest checkpoint of the ``engine`` run in ``rundir`` and the run's options, for
    ``function(..., resume=rundir)`` called with ``options`` (its other keywords). An option
    that differs from ``function``'s default (so was chosen) and from the run's value is an
    error, as are a spec and an ``out`` other than ``rundir``. A run whose data was an object
    (saved as None) takes ``options["data"]``, which must then be given."""
    if spec is not None or out not in (None, rundir):
        raise GraphgrowError("a resumed run keeps its spec and run directory", file=str(rundir),
                             hint="leave out the spec and --out when resuming")
    checkpoint = load_checkpoint(rundir)
    if checkpoint.meta.get("engine") != engine:
        raise GraphgrowError(f"the run directory holds a '{checkpoint.meta.get('engine')}' run", file=str(rundir),
                             hint=f"resume it with graphgrow {checkpoint.meta.get('engine')} --resume")
    saved = dict(checkpoint.meta["options"])
    defaults = {name: p.default for name, p in inspect.signature(function).parameters.items()}
    data_object = saved.get("data", "") is None
    if data_object:
        if isinstance(options["data"], str):
            raise GraphgrowError("the run's data was passed as an object; pass it again", file=str(rundir))
        saved["data"] = options["data"]
    check_options(saved, {name: value for name, value in options.items()
                          if value != defaults.get(name) and not (name == "data" and data_object)}, rundir)
    return checkpoint, saved


def check_options(saved: dict, chosen: dict, rundir: str | Path) -> None:
    """A GraphgrowError naming every ``chosen`` option whose value is not the run's."""
    conflicts = [name for name, value in chosen.items() if name in saved and _plain(value) != saved[name]]
    if conflicts:
        shown = ", ".join(f"{n}={chosen[n]!r} (run: {saved[n]!r})" for n in conflicts)
        raise GraphgrowError(f"option conflicts with the resumed run: {shown}", file=str(rundir),
                             hint="a resumed run keeps the options it was started with; leave them out")


def _plain(value: Any) -> Any:
    """The JSON form of an option value (tuples become lists), for comparison with a saved one."""
    return json.loads(json.dumps(value)) if isinstance(value, (tuple, list, dict)) else value
