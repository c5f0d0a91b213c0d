"""What each `graphgrow` command does; graphgrow.cli.parser maps the command line onto these."""
from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import torch

from ..errors import GraphgrowError

# from any directory after an editable or a plain install
DEMO_SPEC = Path(__file__).resolve().parent.parent / "specs" / "fnn_spiral.yaml"


def _load_network(spec: str, weights: str | None, seed: int):
    from ..compiler.io import load
    return load(spec, weights, seed=seed)


def cmd_check(opts) -> None:
    from ..ir import load_graph
    graph = load_graph(opts.spec)
    print(graph.summary_json() if opts.json else graph.summary_table())


def to_dot(graph) -> str:
    """Graphviz DOT text of a LayerGraph (nodes labelled with op and output shape)."""
    lines = [f'digraph "{graph.name}" {{', "  rankdir=TB;", '  node [shape=box, fontname="Helvetica"];',
             f'  input [shape=oval, label="input\\n{list(graph.input_shape)}"];']
    for node in graph.nodes:
        lines.append(f'  {node.name} [label="{node.name}\\n{node.op} {list(node.out_shape)}"];')
        lines.extend(f"  {source} -> {node.name};" for source in node.inputs)
    lines.append("}")
    return "\n".join(lines)


def cmd_show(opts) -> None:
    from ..compiler.network import compile_graph
    from ..ir import load_graph
    graph = load_graph(opts.spec)
    if opts.code:
        print(compile_graph(graph).print_readable(print_output=False).strip())  # with spec lines
    elif opts.dot:
        print(to_dot(graph))
    else:
        from ..compiler.io import dump
        print(graph.summary_table())
        print()
        print(dump(graph), end="")


def compile_and_export(spec: str, out: Path, fmt: str, seed: int, weights: str | None = None) -> float:
    """Compile a spec, export it, reload the artifact and return its max abs difference to the
    eager module on a probe batch."""
    from ..compiler.export import check_exportable, check_target, example_input, export, load_exported
    from ..ir import load_graph
    check_target(out, fmt)
    check_exportable(load_graph(spec), fmt)  # before anything is built: a spec too deep fails fast
    network = _load_network(spec, weights, seed)
    network.module.eval()
    path = export(network.module, network.graph, out, fmt)
    probe = example_input(network.graph, batch=4)
    with torch.no_grad():
        difference = (load_exported(path)(probe) - network.module(probe)).abs().max().item()
    print(f"wrote {path} ({fmt}); reloaded artifact matches the eager module: max |diff| = {difference:.1e}")
    return difference


def cmd_compile(opts) -> None:
    from ..compiler.export import SUFFIX
    out = Path(opts.output)
    if out.suffix == "":
        out = out.with_suffix(SUFFIX[opts.format])
    compile_and_export(opts.spec, out, opts.format, opts.seed, opts.weights)


def _final_line(final: dict, loss: str) -> str:
    """Loss per split, and the accuracy where the loss is cross-entropy (a classification)."""
    parts = []
    for split in ("train", "test"):
        metrics = final.get(split)
        if not metrics:
            continue
        text = f"{split} loss {metrics['loss']:.4g}"
        if loss == "cross_entropy" and metrics.get("error") is not None:
            text += f", accuracy {100 * (1 - metrics['error']):.2f}%"
        parts.append(text)
    return "; ".join(parts)


def _print_growth(result) -> None:
    """Where a growth run inserted, the loss before and after, and the final metrics."""
    for event in result.insertions:
        print(f"epoch {event['epoch']}: inserted at {', '.join(event['positions'])}: "
              f"train loss {event['loss_before']:.4f} before, {event['loss_after']:.4f} after; "
              f"{event['params_before']} -> {event['params_after']} parameters")
    if not result.insertions:
        print("no insertion")
    final = result.summary["final"]
    splits = _final_line(final, result.summary["config"]["loss"])
    print(f"final: {splits}; {final['params']} parameters, {final['epochs']} epochs in {final['seconds']:.1f} s")
    if result.out is not None:
        print(f"run directory: {result.out} (log.jsonl, summary.json, final.yaml/.pt, model.pt2, curves.png)")


def _launched(opts) -> int | None:
    """With ``--nproc N`` > 1 in a process that is not a rank yet: run the same command in N
    local ranks (runtime.distributed.launch) and return their exit status; else None."""
    import os
    if opts.nproc == 1 or "WORLD_SIZE" in os.environ:
        return None
    from ..runtime.distributed import launch
    return launch(opts.argv, opts.nproc)


def rank_zero() -> bool:
    """True unless this process is a rank > 0 of a data-parallel run (which prints nothing)."""
    import os
    return os.environ.get("RANK", "0") == "0"


def cmd_grow(opts) -> int | None:
    options = dict(spec=opts.spec, data=opts.data, strategy=opts.strategy, insert_every=opts.insert_every,
                   insert_at=opts.insert_at, max_insertions=opts.max_insertions, tau=opts.tau,
                   per_step=opts.per_step, norm=opts.norm, epochs=opts.epochs, lr=opts.lr, batch=opts.batch,
                   momentum=opts.momentum, weight_decay=opts.weight_decay, optimizer=opts.optimizer,
                   damping=opts.damping, loss=opts.loss, sample=opts.sample, widen=opts.widen,
                   neurons=opts.neurons, candidates=opts.candidates, out=opts.out,
                   seed=opts.seed, export=not opts.no_export, device=opts.device, dtype=opts.dtype,
                   dist_timeout=opts.dist_timeout, checkpoint_every=opts.checkpoint_every)
    options = _checked(_resume_options(opts, options, {"export": "no_export"}))  # in the launcher: one error line
    code = _launched(opts)
    if code is not None:
        return code
    from ..sensli import grow
    result = grow(**options, progress=not opts.quiet)
    if rank_zero():
        _print_growth(result)
    return None


def _resume_options(opts, options: dict, dests: dict[str, str]) -> dict:
    """``options`` for a fresh run; with --resume only those given on the command line (the
    rest come from the run's checkpoint), plus ``resume``. ``dests``: the option (argparse
    dest) of each keyword named otherwise."""
    if opts.resume is None:
        return options
    unset = object()  # argparse keeps a namespace's values where no option was given
    given = vars(opts.command_parser.parse_known_args(opts.command_argv, argparse.Namespace(
        **{dest: unset for dest in vars(opts)}))[0])
    return {**{k: v for k, v in options.items() if given.get(dests.get(k, k), unset) is not unset},
            "resume": opts.resume}


def _checked(options: dict) -> dict:
    """``options``; when resuming, each one given must have the run's value (also a default's)."""
    if options.get("resume") is not None:
        from ..runtime.checkpoint import check_options, load_checkpoint
        rundir = options["resume"]
        check_options(load_checkpoint(rundir).meta["options"],
                      {k: v for k, v in options.items() if k not in ("spec", "out", "resume")}, rundir)
    return options



def cmd_sensitivities(opts) -> None:
    from ..compiler.io import load_network, weights_path
    from ..ir import load_graph
    from ..runtime.data import load_data
    from ..runtime.devices import place_network
    from ..sensli import sensitivities
    if opts.random_weights:  # a fresh initialisation from --seed, even when weights lie beside the spec
        if opts.weights is not None:
            raise GraphgrowError("give --weights or --random-weights, not both", option="random_weights")
        network = load_network(load_graph(opts.spec), opts.seed)
    elif opts.weights is None and not weights_path(opts.spec).exists():
        raise GraphgrowError(f"no weights: {weights_path(opts.spec)} does not exist", option="weights",
                             hint="pass --weights W (trained weights), or --random-weights to score a freshly "
                                  "initialised network on purpose")
    else:
        network = load_network(opts.spec, opts.seed, opts.weights)
    network = place_network(network, opts.device, opts.dtype)
    report = sensitivities(network, load_data(opts.data, opts.seed), norm=opts.norm, loss=opts.loss,
                           sample=opts.sample, seed=opts.seed, all_norms=opts.all_norms, progress=not opts.json,
                           candidates=opts.candidates)
    if opts.json:
        print(json.dumps(report.to_json(), indent=2))
        return
    print(f"{len(report.candidates)} candidates, {report.samples} samples, norm {report.norm}; "
          f"threshold reference (mean merit of existing weights) {report.reference:.4g}")
    rows = sorted(report.candidates, key=lambda c: -c.merit)
    width = max(len(c.position) for c in rows) if rows else 8
    print(f"{'candidate':<{width}}  {'kind':<9}  {'merit':>10}  {'ratio':>8}  {'new params':>10}")
    for c in rows:
        print(f"{c.position:<{width}}  {c.kind:<9}  {c.merit:>10.4g}  {report.ratio(c):>8.3g}  {c.new_params:>10}")


# `graphgrow mgopt` passes every parameter of graphgrow.mgopt.run; the option of parameter p is
# --p (dest p) except these. Negated flags store the opposite of the parameter.
MGOPT_RENAMED = {"alpha": "lr"}
MGOPT_NEGATED = {"progress": "quiet", "descent_check": "no_descent_check", "log_steps": "no_log_steps",
                 "export": "no_export"}
#: options of the command line alone: how many processes run the command (_launched), not what one does
LAUNCH_OPTIONS = {"nproc"}


def mgopt_arguments(opts) -> dict:
    """The keyword arguments of ``graphgrow.mgopt.run`` from parsed ``mgopt`` options."""
    from ..mgopt import run
    arguments = {}
    for name in inspect.signature(run).parameters:
        if name in MGOPT_NEGATED:
            arguments[name] = not getattr(opts, MGOPT_NEGATED[name])
        else:
            arguments[name] = getattr(opts, MGOPT_RENAMED.get(name, name))
    return arguments


def cmd_mgopt(opts) -> int | None:
    arguments = mgopt_arguments(opts)
    progress = arguments.pop("progress")
    dests = {name: MGOPT_NEGATED.get(name, MGOPT_RENAMED.get(name, name)) for name in arguments}
    arguments = _checked(_resume_options(opts, arguments, dests))  # in the launcher: one error line
    code = _launched(opts)
    if code is not None:
        return code
    from ..mgopt import run
    result = run(**arguments, progress=progress)
    if not rank_zero():
        return None
    summary, final = result.summary, result.summary["final"]
    print(f"{summary['variant']} on a {summary['hierarchy']} hierarchy, levels {', '.join(summary['levels'])}")
    print(f"{final['iterations']} fine iterations, {final['corrections']} coarse corrections taken "
          f"({final['rejected']} rejected), {final['work']:.1f} work units, {final['train_time']:.1f} s")
    print(f"final: {_final_line(final, opts.loss)}")
    if result.out is not None:
        print(f"run directory: {result.out}")
    return None


def cmd_rmntr(opts) -> None:
    from ..rmntr import run
    l1 = opts.l1 if opts.l1 in ("weights", "all") else opts.l1.split(",")
    options = {"spec": opts.spec, "data": opts.data, "hierarchy": opts.hierarchy, "levels": opts.levels,
               "beta": opts.beta, "l1": l1, "gtol": opts.gtol, "max_iterations": opts.max_iterations,
               "loss": opts.loss, "warmup": opts.warmup, "warmup_lr": opts.warmup_lr, "model": opts.model,
               "pairing": opts.pairing, "coarse_scaling": opts.coarse_scaling, "seed": opts.seed, "out": opts.out, "radius": opts.radius,
               "kappa_h": opts.kappa_h, "coarse_iterations": opts.coarse_iterations,
               "spg_iterations": opts.spg_iterations, "lm_lambda": opts.lm_lambda,
               "rescale_coarse_steps": opts.rescale_coarse_steps,
               "checkpoint_every": opts.checkpoint_every}
    result = run(**_checked(_resume_options(opts, options, {})), progress=not opts.quiet)
    final = result.summary["final"]
    print(f"RMNTR on {', '.join(result.summary['levels'])}: {final['reason']} after {final['iterations']} "
          f"iterations; F {final['F']:.6g}, h {final['h']:.3g}")
    print(f"fine level: {final['fine_gradients']} gradients, {final['fine_hvps']} HVPs; work {final['work']:.1f} "
          f"fine gradients; {final['seconds']:.1f} s; zero weights {100 * final['zero_share']:.1f}%; "
          f"coarse steps accepted/tried {final['coarse_accepted']}/{final['coarse_tried']}")
    if "l2_error" in final:
        print(f"PINN: L2 relative error {final['l2_error']:.3g}, residual RMSE {final['residual_rmse']:.3g}")
    if result.out is not None:
        print(f"run directory: {result.out}")



def cmd_demo(opts) -> None:
    """SensLI on the spiral data (thesis 4.5.1): FNN 2-5-2, full-batch SGD lr 0.2, one layer
    inserted at epoch 450 where the sensitivities say, 1400 more epochs."""
    import itertools
    import time
    from ..runtime.runlog import RunDirectoryTaken
    from ..sensli import grow
    default = time.strftime("runs/demo-%Y%m%d-%H%M%S")
    print(f"SensLI demo: {opts.spec} on the spiral data; insertion at epoch {opts.insert_at} of {opts.epochs}")
    for attempt in itertools.count(1):
        # the run directory is created exclusively: a demo started in the same second takes the next name
        out = opts.out or (default if attempt == 1 else f"{default}-{attempt}")
        try:
            result = grow(opts.spec, "spiral", strategy="sensli", insert_at=[opts.insert_at], max_insertions=1,
                          epochs=opts.epochs, lr=0.2, out=out, seed=opts.seed, progress=True, log_steps=False)
            break
        except RunDirectoryTaken:
            if opts.out:
                raise
    _print_growth(result)


