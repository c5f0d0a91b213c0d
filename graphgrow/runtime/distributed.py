"""Data-parallel training with torch.distributed, growth included.

Every process (rank) holds the whole data set and the same network, draws the same seeded
batch order, and takes a fixed contiguous part of every global batch. Its loss is scaled by
``world * local / global`` so that the gradient DDP averages is the single-process gradient of
the global batch (a short last batch included); evaluation and the sensitivity pass sum their
parts over the ranks. Structural change is the trap: DDP hooks the parameters present when it
is built, and re-wrapping a network that differs between ranks would silently broadcast rank
0's tensors into another graph. So before every rebuild the ranks compare a digest of the
event (the chosen positions), the new graph's YAML and its state; any difference raises
``GraphgrowError`` on every rank. Then the old wrapper is dropped, the optimizer state carried
(``Trainer.replace_network``) and a new wrapper built.

Checkpoints (runtime.checkpoint.Checkpointer) need the ranks to act at the same step: a
signal's vote rides along in every ``DataParallel.sum`` (no extra collective), rank 0 writes
while the others wait in ``on_rank_zero``, which hands its outcome (or its error) to all.

``launch(argv, nproc)`` starts ``nproc`` local workers of the command line (gloo on the CPU,
NCCL on CUDA), forwards SIGINT/SIGTERM to them and takes them down with it when it is killed;
``torchrun --nproc-per-node N -m graphgrow grow ...`` sets the same environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), which ``joined`` reads.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..compiler.io import dump
from ..compiler.network import Network
from ..errors import GraphgrowError
from .interrupts import RunInterrupted, handling_stop_signals
from .optimizers import optimizer_kind
from .splits import Split, error_count, evaluate
from .train import Trainer

#: seconds a collective waits for the other ranks before the run stops with an error
DEFAULT_TIMEOUT = 300.0
#: set by ``launch`` in its workers: the launcher's process id (a worker dies with it)
LAUNCHER_VARIABLE = "GRAPHGROW_LAUNCHER_PID"
Result = TypeVar("Result")


class ReportedByRankZero(GraphgrowError):
    """Raised on the other ranks when rank 0 failed at something they waited for (rank 0
    raises, and the command line prints, the error itself)."""


@dataclass
class DataParallel:
    """This process's part in a data-parallel run. ``interrupt``: the run's
    runtime.interrupts.InterruptFlag, whose vote every ``sum`` carries."""
    rank: int
    world: int
    device: torch.device
    interrupt: Any = None

    def part(self, size: int) -> slice:
        """The contiguous rows of ``size`` that belong to this rank (sizes differ by at most one)."""
        return slice(size * self.rank // self.world, size * (self.rank + 1) // self.world)

    def sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor summed over the ranks (one all-reduce, in float64; each comes back in its
        own dtype and on its own device)."""
        votes = [] if self.interrupt is None else self.interrupt.vote()
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors] +
                         [torch.tensor(votes, dtype=torch.float64, device=self.device)])
        with collective("a sum over the ranks", self.rank):
            dist.all_reduce(flat)
        if votes:  # every rank makes the same sums, so all settle the same signal at the same one
            self.interrupt.settle(flat[flat.numel() - len(votes):].tolist())
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].reshape(t.shape).to(t.device, t.dtype))
            start += t.numel()
        return out

    def gathered(self, value: Any) -> list:
        """Every rank's ``value`` (picklable), in rank order."""
        values: list = [None] * self.world
        with collective("gathering from the ranks", self.rank):
            dist.all_gather_object(values, value)
        return values

    def on_rank_zero(self, what: str, action: Callable[[], Result]) -> Result:
        """``action()`` on rank 0 while the others wait; every rank returns its (picklable)
        result, or every rank raises when it failed (rank 0 its own error, the others
        ReportedByRankZero), so that no rank runs ahead of a failed write."""
        outcome: list = [None]
        failure = None
        if self.rank == 0:
            try:
                outcome = [("done", action())]
            except Exception as error:  # noqa: BLE001 - handed to the other ranks, then raised here
                failure = error
                outcome = [("failed", str(error).splitlines()[0] if str(error) else type(error).__name__)]
        with collective(what, self.rank):
            dist.broadcast_object_list(outcome, src=0)
        if failure is not None:
            raise failure
        status, value = outcome[0]
        if status == "failed":
            raise ReportedByRankZero(f"data-parallel run: rank 0 failed at {what} ({value}); rank {self.rank} stops")
        return value

    def agree(self, what: str, digest: str) -> None:
        """Raise GraphgrowError on every rank unless all ranks hand in the same ``digest``."""
        digests = self.gathered(digest)
        differing = [rank for rank, other in enumerate(digests) if other != digests[0]]
        if differing:
            raise GraphgrowError(f"data-parallel run: ranks {differing} disagree with rank 0 on {what} "
                                 f"(rank {self.rank} stops; no rank rebuilds)",
                                 hint="every rank must make the same choice: same seed, data and options on "
                                      "all ranks, and no rank-dependent randomness in the engine")

    def wrap(self, module: torch.nn.Module) -> DistributedDataParallel:
        with collective("wrapping the network in DDP", self.rank):
            return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)


@contextlib.contextmanager
def collective(what: str, rank: int):
    """Turn a failed or timed-out collective (a rank died or hangs) into one GraphgrowError."""
    try:
        yield
    except (RuntimeError, dist.DistError) as error:
        if isinstance(error, GraphgrowError):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GraphgrowError(f"data-parallel run: {what} failed on rank {rank}: another rank stopped or did "
                             f"not answer in time ({first})",
                             hint="see the other ranks' output for the first error") from None


@contextlib.contextmanager
def joined(device: torch.device, timeout: float = DEFAULT_TIMEOUT):
    """The DataParallel of this process when it was started as one of several ranks
    (WORLD_SIZE > 1 in the environment, as ``launch`` and torchrun set it), else None. Joins the
    process group (gloo on the CPU, NCCL on CUDA; on CUDA each rank takes device LOCAL_RANK) and
    leaves it on exit when it joined it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield None
        return
    rank = int(os.environ["RANK"])
    if LAUNCHER_VARIABLE in os.environ:
        _die_with_launcher(int(os.environ[LAUNCHER_VARIABLE]))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        with collective("joining the process group", rank):
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout), rank=rank, world_size=world)
    try:
        yield DataParallel(rank, world, device)
    except RunInterrupted:  # every rank stops at the same step, with the checkpoint written
        _leave_together(rank)
        raise
    finally:
        if created:
            dist.destroy_process_group()


def _leave_together(rank: int) -> None:
    """Wait for every rank before leaving the group after an agreed stop: a rank that closes its
    connections while another still uses them can make gloo abort that process ("terminate
    called without an active exception": exit 134 instead of 143, seen once in a fresh CI run).
    Not after a finished run: rank 0 then still writes and exports, for longer than a timeout."""
    with collective("leaving the process group", rank):
        dist.barrier()


def join_checkpoints(parallel: DataParallel, checkpointing: bool, every: int | None, checkpoint=None) -> None:
    """Check that every rank checkpoints alike (all or none, at the same interval) and, when
    resuming, continues from the same checkpoint (its name and checksums): a GraphgrowError on
    every rank otherwise, before any rank trains."""
    resumed = None if checkpoint is None else checkpoint.fingerprint()
    parallel.agree("checkpoints (out, checkpoint_every and the checkpoint resumed from)",
                   json.dumps([checkpointing, every, resumed]))


def network_digest(network: Network, event: dict) -> str:
    """SHA-256 over an event (the chosen positions), the graph's YAML and the state."""
    digest = hashlib.sha256(json.dumps(event, sort_keys=True, default=str).encode())
    digest.update(dump(network.graph).encode())
    for name, tensor in network.state().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def refusal(network: Network, optimizer: str) -> GraphgrowError | None:
    """Why ``network`` cannot train data-parallel with ``optimizer`` here, or None."""
    norms = [node.name for node in network.graph.nodes if node.op == "batchnorm"]
    if norms:
        return GraphgrowError(f"data-parallel training of '{network.graph.name}': batchnorm node '{norms[0]}' "
                              "would normalise with each rank's part of the batch, not the global batch",
                              file=network.graph.source, node=norms[0],
                              hint="train it in one process (leave out --nproc), or use layernorm")
    if not optimizer_kind(optimizer).carries_state:
        return GraphgrowError(f"data-parallel training with optimizer '{optimizer}': its statistics (the "
                              "preconditioner's layer covariances) would come from each rank's part only",
                              hint="use sgd or adam with --nproc, or train in one process")
    return None


class DataParallelTrainer(Trainer):
    """A Trainer for one rank of a data-parallel run (see the module doc); hooks run on every
    rank and see the same numbers as in a single process."""

    def __init__(self, network: Network, data, config=None, *, data_parallel: DataParallel, **options):
        error = refusal(network, config.optimizer if config else "sgd")
        if error is not None:
            raise error
        super().__init__(network, data, config, **options)
        self.data_parallel = data_parallel
        self.wrapped = data_parallel.wrap(self.network.module)
        self._local_share = 1.0

    def train_batch(self, index) -> tuple[float, int | None, int]:
        parallel = self.data_parallel
        if isinstance(index, slice):
            index = torch.arange(len(self.train_split))
        size = int(index.shape[0])
        x, y = self.train_split.rows(index[parallel.part(size)], self.network.device)
        # DDP averages over the ranks: world * local / global makes that the global mean's gradient
        self._local_share = parallel.world * x.shape[0] / size
        value, output = self.step(x, y)
        wrong = error_count(output, y) if x.shape[0] else 0
        total_loss, total_wrong = parallel.sum([torch.tensor([value * x.shape[0], wrong or 0],
                                                             dtype=torch.float64)])[0].tolist()
        # a count of samples, or of fractions of positions (error_count): the sum as it came
        return total_loss / size, None if wrong is None else (int(total_wrong) if total_wrong.is_integer() else total_wrong), size

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        with collective("the gradient all-reduce", self.data_parallel.rank):
            output = self.wrapped(x)
            # an empty part still joins the all-reduce, with a zero gradient
            loss = self.loss(output, y) if x.shape[0] else output.sum() * 0.0
            (loss * self._local_share).backward()
        self.optimizer.step()
        self.iteration += 1
        return float(loss.detach()), output.detach()

    def measure(self, network: Network, split) -> dict:
        part = self.data_parallel.part(len(split))
        return evaluate(network, Split(split.x[part], split.y[part]), self.config.loss,
                        reduce=lambda sums: self.data_parallel.sum([sums])[0])

    def replace_network(self, network: Network, carry=None, *, record=None, **event) -> None:
        self.data_parallel.agree("the new network (positions, graph and state)", network_digest(network, event))
        super().replace_network(network, carry, record=record, **event)
        self.wrapped = self.data_parallel.wrap(self.network.module)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_launcher(launcher: int) -> None:
    """Have the kernel kill this worker when its launcher dies (Linux; elsewhere a killed
    launcher leaves its workers to time out at their next collective)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before the line above
        os._exit(128 + signal.SIGKILL)


def _forwarding_signals(workers: list[subprocess.Popen]):
    """SIGINT and SIGTERM to the launcher go to every worker, once each (the workers are in a
    session of their own, so a Ctrl-C in the terminal reaches them only this way)."""
    def forward(signum, frame):
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)
    return handling_stop_signals(forward)


def launch(argv: list[str], nproc: int, *, grace: float = 30.0) -> int:
    """Run ``python -m graphgrow *argv`` in ``nproc`` local ranks (rank 0's output is shown,
    the others' errors only). SIGINT and SIGTERM are forwarded to every rank (they stop at
    a step they agree on, with a checkpoint); the ranks die with the launcher. When a rank
    fails, the others get ``grace`` seconds to stop on their own (they see the failure at their
    next collective), then they are ended. Returns the first non-zero exit status (128 + N for
    a rank ended by signal N), else 0."""
    if not (isinstance(nproc, int) and nproc >= 1):
        raise GraphgrowError(f"--nproc must be a positive integer, got {nproc!r}")
    port = free_port()
    workers: list[subprocess.Popen] = []
    with _forwarding_signals(workers):
        for rank in range(nproc):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
                   LAUNCHER_VARIABLE: str(os.getpid())}
            workers.append(subprocess.Popen([sys.executable, "-m", "graphgrow", *argv], env=env, start_new_session=True,
                                            stdout=None if rank == 0 else subprocess.DEVNULL))
        failed, deadline = 0, None
        while any(w.poll() is None for w in workers):
            codes = [w.returncode for w in workers if w.returncode is not None]
            if not failed and any(codes):
                failed = next(c for c in codes if c)
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                for worker in workers:
                    if worker.poll() is None:
                        worker.kill()
            time.sleep(0.05)
    code = failed or next((w.returncode for w in workers if w.returncode), 0)
    return 128 - code if code < 0 else code
