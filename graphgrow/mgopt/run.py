"""The one-call MG/Opt engine the CLI calls: build a hierarchy from a spec, train, write the run."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..compiler.io import load_network
from ..errors import GraphgrowError
from ..runtime.checkpoint import (Checkpointer, placement, restore_torch_rng, restored_network, resume_run,
                                  saved_options)
from ..runtime.data import load_data
from ..runtime.devices import place_network
from ..runtime.distributed import DEFAULT_TIMEOUT, join_checkpoints, joined
from ..runtime.runlog import RunLog
from ..runtime.splits import as_splits, check_data_fits, place
from .network import build_network_hierarchy, iterations_per_epoch
from .config import MGOptConfig
from .optimizer import nested_schedule, optimize, prolong_from


@dataclass
class MGOptResult:
    network: Any
    records: list[dict]
    summary: dict
    out: Any = None


def run(spec=None, data="spiral", *, hierarchy: str = "depth", levels: int = 2, kappa: float = 0.5, K: int = 10,
        lam: float = 0.0, alpha: float = 0.1, alpha_bar: float | None = None, alpha_cgc: float = 1.0,
        variant: str = "mgopt", epochs: int = 10, batch: int | None = 100, loss: str = "cross_entropy",
        pre_smooth: int = 1, post_smooth: int = 1, min_gap: int = 1, same_batch: bool = False,
        momentum: float = 0.0, descent_check: bool = True, backtracking: int = 0, schedule: str = "constant",
        decay: float = 100.0, nested_epochs: int | Sequence[int] = 1, interpolation: str = "constant",
        restriction: str = "half-transpose", out=None, seed: int = 0, progress: bool = False, eval_every: int = 1,
        evals_per_epoch: int = 1, work_budget: float | None = None, log_steps: bool = True,
        export: bool = True, device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None, dist_timeout: float = DEFAULT_TIMEOUT,
        checkpoint_every: int | None = None, resume=None) -> MGOptResult:
    """Train ``spec`` on ``data`` with multilevel optimisation on a hierarchy built from it.

    ``spec``: spec path, LayerGraph or Network; ``data``: a data set or spiral / mnist:PATH /
    npz:PATH. ``hierarchy``: depth | width | batch | resolution with ``levels`` levels (1 level:
    plain SGD). ``variant``: mgopt (Algorithm 5, V-cycle for levels > 2), no-correction, or
    nested (``nested_epochs`` epochs of SGD on each coarse level, or a list with one count per
    coarse level, coarsest first; then ``epochs`` on the finest). ``min_gap``: fine SGD steps
    between corrections (0: a V-cycle every iteration); ``same_batch``: every level of a
    correction uses the fine mini-batch; ``momentum``: heavy-ball momentum on every level.
    ``interpolation`` (constant | linear | identity) is the depth prolongation, ``restriction``
    (half-transpose: R = P^T / 2 | injection: coarse block j = fine block 2j) its restriction.
    One epoch is ceil(train size / batch) fine iterations with mini-batches drawn by ``seed``.
    With ``out`` the run directory gets log.jsonl (step and eval records with wall time and
    work units), summary.json, final.yaml + .pt, model.pt2, curves.png and checkpoints/ (every
    ``checkpoint_every`` iterations, else every epoch's worth of iterations, and at
    SIGINT/SIGTERM); ``resume=RUNDIR`` continues an interrupted run from its latest checkpoint
    with its own options, on its device and dtype (see graphgrow.sensli.grow). The full training and
    test sets are evaluated every ``eval_every`` epochs, or ``evals_per_epoch`` times per epoch.
    ``work_budget`` (work units, one = a fine gradient evaluation) ends training when spent,
    whichever of it and ``epochs`` comes first (to compare contenders at equal work).
    ``device`` (auto, cpu, cuda, cuda:N, mps) and ``dtype`` (float32, float64): where and in which
    type every level trains (None: as the network is); the data are cast to the network's dtype.
    Started as one of several ranks (``graphgrow mgopt --nproc N`` or torchrun) every level's
    losses and gradients are summed over the ranks' parts of each batch (runtime.distributed;
    collectives give up after ``dist_timeout`` seconds); rank 0 writes the run directory and
    its checkpoints, at iterations all ranks agree on."""
    options = {name: value for name, value in locals().items() if name not in ("spec", "out", "progress", "resume")}
    if resume is None:
        if spec is None:
            raise GraphgrowError("mgopt needs a spec",
                                 hint="give a spec, or --resume RUNDIR (resume=RUNDIR) to continue an interrupted run")
        dataset = load_data(data, seed)
        network = place_network(load_network(spec, seed), device, dtype)
        return _run(network, dataset, options, str(getattr(network.graph, "source", None) or network.graph.name),
                    out, progress)
    checkpoint, saved = resume_run("mgopt", run, options, spec, out, resume)
    return _run(restored_network(checkpoint, checkpoint.state["weights"]), load_data(saved["data"], saved["seed"]),
                saved, checkpoint.meta["spec"], resume, progress, checkpoint)


def _run(network, dataset, o: dict, spec_name: str, out, progress: bool, checkpoint=None) -> MGOptResult:
    """Run (or, with ``checkpoint``, continue) an MG/Opt run with ``o`` (run's keywords)."""
    from ..runtime.plots import plot_run
    hierarchy, levels, variant, epochs, batch, loss, seed = (o[k] for k in (
        "hierarchy", "levels", "variant", "epochs", "batch", "loss", "seed"))
    work_budget, eval_every, evals_per_epoch, log_steps = (o[k] for k in (
        "work_budget", "eval_every", "evals_per_epoch", "log_steps"))
    config = MGOptConfig(**{k: o[k] for k in ("alpha", "alpha_bar", "alpha_cgc", "kappa", "K", "lam", "variant",
                                              "pre_smooth", "post_smooth", "min_gap", "same_batch", "momentum",
                                              "descent_check", "backtracking", "schedule", "decay")})
    if o["same_batch"] and hierarchy == "batch":
        raise GraphgrowError("same_batch contradicts the batch hierarchy (its levels differ only in batch size)",
                             hint="use another hierarchy, or leave same_batch off", option="same_batch")
    if not (isinstance(epochs, int) and epochs >= 0):
        raise GraphgrowError(f"epochs must be a non-negative integer, got {epochs!r}", option="epochs")
    with joined(network.device, o["dist_timeout"]) as parallel:
        checkpointing = out is not None  # on every rank: the others join rank 0's checkpoints
        if parallel is not None:  # rank 0 alone shows progress and writes the run directory
            join_checkpoints(parallel, checkpointing, o["checkpoint_every"], checkpoint)
            network.to(parallel.device)
            progress = progress and parallel.rank == 0
            out = out if parallel.rank == 0 else None
        train_split, test_split = (place(split, network.device) for split in as_splits(dataset, network.dtype))
        check_data_fits(network, train_split, loss, test_split)
        interpolation, restriction = o["interpolation"], o["restriction"]
        options = {"interpolation": interpolation, "restriction": restriction} if hierarchy == "depth" else {}
        if hierarchy != "depth" and (interpolation, restriction) != ("constant", "half-transpose"):
            raise GraphgrowError(f"interpolation and restriction choose the depth transfers; hierarchy '{hierarchy}' "
                                 "has its own", hint="leave them at their defaults or use hierarchy depth",
                                 option="restriction")
        levels_built = build_network_hierarchy(network, train_split, hierarchy, levels, batch=batch, loss=loss,
                                               data_parallel=parallel, **options)
        per_epoch = iterations_per_epoch(len(train_split), batch)
        if not (isinstance(evals_per_epoch, int) and evals_per_epoch >= 1 and isinstance(eval_every, int) and eval_every >= 1):
            raise GraphgrowError("eval_every and evals_per_epoch must be positive integers")
        eval_interval = max(per_epoch // evals_per_epoch, 1) if evals_per_epoch > 1 else per_epoch * eval_every
        config.nested_iterations = nested_iterations(o["nested_epochs"], len(levels_built), per_epoch)
        iterations = epochs * per_epoch
        fine = levels_built.levels[0]
        bar = None
        if progress:
            from tqdm.auto import tqdm
            total = iterations + (sum(nested_schedule(config, len(levels_built))) if variant == "nested" else 0)
            bar = tqdm(total=total, initial=checkpoint.meta["step"] if checkpoint else 0, desc=f"mgopt {variant}",
                       unit="it", leave=False, dynamic_ncols=True)

        checkpointer = None
        if checkpointing:
            every = per_epoch if o["checkpoint_every"] is None else o["checkpoint_every"]
            checkpointer = Checkpointer(out, "mgopt", {"options": saved_options(o), "spec": spec_name,
                                                       "placement": placement(network)}, every=every,
                                        data_parallel=parallel)
        log = RunLog(out, resume=None if checkpoint is None else checkpoint.state["log_length"])
        with log, (checkpointer.interrupt.installed() if checkpointer else nullcontext()):
            if checkpoint is None:
                log.log("start", config=config.to_dict(), hierarchy=hierarchy, levels=levels_built.names,
                        network=network.graph.name, params=network.graph.num_params(), flops=network.graph.flops(),
                        costs=[p.cost for p in levels_built.levels], epochs=epochs, batch=batch, seed=seed,
                        train_size=len(train_split), test_size=len(test_split) if test_split else 0)
            else:
                for name, reason in checkpoint.skipped:
                    log.log("checkpoint_skipped", checkpoint=name, reason=reason)
                restore_buffers(levels_built, checkpoint.state["buffers"])
                restore_torch_rng(checkpoint.state, parallel)
                log.log("resume", checkpoint=checkpoint.directory.name, iteration=checkpoint.meta["step"])
            origin = time.perf_counter() - (checkpoint.state["train_time"] if checkpoint else 0.0)
            excluded = 0.0  # evaluation time is not training time

            def evaluate_and_log(params, iteration, epoch, work, phase="fine"):
                nonlocal excluded
                began = time.perf_counter()
                train = fine.evaluate(params, train_split)
                test = fine.evaluate(params, test_split) if test_split is not None else None
                record = log.log("eval", epoch=epoch, iteration=iteration, work=work, phase=phase,
                                 train_time=began - origin - excluded, train_loss=train["loss"],
                                 train_error=train["error"], test_loss=test and test["loss"],
                                 test_error=test and test["error"])
                excluded += time.perf_counter() - began
                return record

            if checkpoint is None:
                evaluate_and_log(fine.parameters(), 0, 0, 0.0)
            seen = {"fine": checkpoint.state["fine_iterations"] if checkpoint else 0}

            def save(optimizer):
                def state():
                    return {"optimizer": optimizer.state_dict(), "fine_iterations": seen["fine"],
                            "weights": {**network.state(), **fine_weights(levels_built, optimizer)},
                            "buffers": level_buffers(levels_built),
                            "train_time": time.perf_counter() - origin - excluded, "log_length": len(log.records)}
                return checkpointer.write(optimizer.iteration, network.graph, state, phase=list(optimizer.phase))

            def on_iteration(params, info, optimizer):
                if log_steps:
                    log.log("step", iteration=info.iteration, kind=info.kind, loss=info.loss, work=info.work,
                            grad_sq_norm=info.grad_sq_norm, restricted_sq_norm=info.restricted_sq_norm,
                            slope=info.slope, step=info.step, reason=info.reason)
                if bar is not None:
                    bar.update(1)
                if not math.isfinite(info.loss):
                    raise _Diverged(info.iteration)
                if info.kind.startswith("level"):
                    done = info.iteration + 1
                    if done % eval_interval == 0:
                        evaluate_and_log(params, done, 0, info.work, phase=info.kind)
                else:
                    seen["fine"] += 1
                    last = seen["fine"] == iterations or (work_budget is not None and optimizer.work >= work_budget)
                    if seen["fine"] % eval_interval == 0 or last:
                        epoch = seen["fine"] / per_epoch
                        evaluate_and_log(params, info.iteration + 1, int(epoch) if epoch.is_integer() else epoch,
                                         info.work)
                if checkpointer is not None:
                    checkpointer.stop_if_interrupted(log, lambda: save(optimizer), iteration=optimizer.iteration)
                    if checkpointer.due(optimizer.iteration):
                        save(optimizer)

            try:
                theta, _, optimizer = optimize(levels_built, fine.parameters(), config, iterations, seed=seed,
                                               work_budget=work_budget, callback=on_iteration,
                                               resume=optimizer_state(checkpoint, network.device))
                diverged = None
            except _Diverged as stop:
                log.log("diverged", iteration=stop.iteration)
                theta, optimizer, diverged = None, None, stop.iteration
            finally:
                if bar is not None:
                    bar.close()
            if theta is not None:
                fine.load(theta)
            final = {"train": fine.evaluate(fine.parameters(), train_split),
                     "test": fine.evaluate(fine.parameters(), test_split) if test_split is not None else None,
                     "train_time": time.perf_counter() - origin - excluded,
                     "work": optimizer.work if optimizer else None,
                     "transfers": optimizer.transfers if optimizer else 0,
                     "transfer_work": optimizer.transfer_work if optimizer else None,
                     "iterations": optimizer.iteration if optimizer else 0,
                     "corrections": optimizer.corrections if optimizer else 0,
                     "rejected": optimizer.rejections if optimizer else 0, "diverged": diverged}
            log.log("end", **final)
            summary = {"spec": spec_name,
                       "hierarchy": hierarchy, "levels": levels_built.names,
                       "costs": [p.cost for p in levels_built.levels], "variant": variant, "seed": seed,
                       "epochs": epochs, "batch": batch, "config": config.to_dict(), "final": final}
            if out is not None:
                log.save_network(network)
                if o["export"]:
                    log.export(network)
                plot_run(log.records, log.path("curves.png"),
                         title=f"{network.graph.name}: MG/Opt {variant}, {hierarchy} x{len(levels_built)}")
                log.write_json("summary.json", summary)
        return MGOptResult(network, log.records, summary, out)


def nested_iterations(epochs: int | Sequence[int], levels: int, per_epoch: int) -> int | list[int]:
    """SGD iterations per coarse level (level 1 first) from epochs given as one count for every
    coarse level or as a list, coarsest level first (the order they run in)."""
    counts = [epochs] if isinstance(epochs, int) else list(epochs)
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise GraphgrowError(f"nested_epochs must be non-negative integers, got {epochs!r}", option="nested_epochs")
    if len(counts) == 1:
        return counts[0] * per_epoch
    if len(counts) != levels - 1:
        raise GraphgrowError(f"nested_epochs has {len(counts)} counts for {levels - 1} coarse levels",
                             hint="give one count for all coarse levels or one per coarse level, coarsest first",
                             option="nested_epochs")
    return [c * per_epoch for c in reversed(counts)]


def level_buffers(hierarchy) -> list[dict]:
    """The buffers (batch-norm statistics) of every level's network: the iterates hold only
    trainable parameters."""
    return [{n: b.detach().clone() for n, b in level.network.module.named_buffers()} for level in hierarchy.levels]


def restore_buffers(hierarchy, saved: list[dict]) -> None:
    with torch.no_grad():
        for level, buffers in zip(hierarchy.levels, saved):
            named = dict(level.network.module.named_buffers())
            for name, value in buffers.items():
                named[name].copy_(value)


def fine_weights(hierarchy, optimizer) -> dict:
    """The optimizer's current parameters on the finest level (prolonged during nested
    iteration), by parameter name."""
    if optimizer.iterate is None:
        return {}
    fine = hierarchy.levels[0]
    return {name: value.clone() for name, value in
            fine.named(prolong_from(hierarchy, optimizer.iterate, optimizer.phase[0])).items()}


def optimizer_state(checkpoint, device) -> dict | None:
    """The checkpoint's ``MultilevelOptimizer`` state with its vectors (read onto the CPU) on the
    run's ``device``; the generator state stays on the CPU."""
    if checkpoint is None:
        return None
    state = dict(checkpoint.state["optimizer"])
    for key in ("iterate", "velocity"):
        if state[key] is not None:
            state[key] = {k: v.to(device) for k, v in state[key].items()}
    return state


class _Diverged(Exception):
    def __init__(self, iteration: int):
        super().__init__(f"loss is not finite at iteration {iteration}")
        self.iteration = iteration
