"""The `graphgrow` command line. User mistakes print one line `path:line:col: error: ...`
and exit with status 2; no traceback."""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

from . import __version__
from .errors import GraphgrowError

# shipped with the package (graphgrow/specs links to the repository's specs/), so the demo runs
# from any directory after an editable or a plain install
DEMO_SPEC = Path(__file__).resolve().parent / "specs" / "fnn_spiral.yaml"


def _load_network(spec: str, weights: str | None, seed: int):
    from .compiler.io import load
    return load(spec, weights, seed=seed)


def cmd_check(opts) -> None:
    from .ir import load_graph
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
    from .compiler.network import compile_graph
    from .ir import load_graph
    graph = load_graph(opts.spec)
    if opts.code:
        print(compile_graph(graph).print_readable(print_output=False).strip())  # with spec lines
    elif opts.dot:
        print(to_dot(graph))
    else:
        from .compiler.io import dump
        print(graph.summary_table())
        print()
        print(dump(graph), end="")


def compile_and_export(spec: str, out: Path, fmt: str, seed: int, weights: str | None = None) -> float:
    """Compile a spec, export it, reload the artifact and return its max abs difference to the
    eager module on a probe batch."""
    from .compiler.export import check_exportable, check_target, example_input, export, load_exported
    from .ir import load_graph
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
    from .compiler.export import SUFFIX
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
    from .runtime.distributed import launch
    return launch(opts.argv, opts.nproc)


def _rank_zero() -> bool:
    """True unless this process is a rank > 0 of a data-parallel run (which prints nothing)."""
    import os
    return os.environ.get("RANK", "0") == "0"


def cmd_grow(opts) -> int | None:
    code = _launched(opts)
    if code is not None:
        return code
    from .sensli import grow
    result = grow(opts.spec, opts.data, strategy=opts.strategy, insert_every=opts.insert_every,
                  insert_at=opts.insert_at, max_insertions=opts.max_insertions, tau=opts.tau,
                  per_step=opts.per_step, norm=opts.norm, epochs=opts.epochs, lr=opts.lr, batch=opts.batch,
                  momentum=opts.momentum, weight_decay=opts.weight_decay, optimizer=opts.optimizer, damping=opts.damping,
                  loss=opts.loss, sample=opts.sample, widen=opts.widen, out=opts.out, seed=opts.seed,
                  progress=not opts.quiet, export=not opts.no_export, device=opts.device, dtype=opts.dtype,
                  dist_timeout=opts.dist_timeout)
    if _rank_zero():
        _print_growth(result)
    return None


def cmd_sensitivities(opts) -> None:
    from .compiler.io import load_network, weights_path
    from .ir import load_graph
    from .runtime.data import load_data
    from .runtime.devices import place_network
    from .sensli import sensitivities
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
                           sample=opts.sample, seed=opts.seed, all_norms=opts.all_norms, progress=not opts.json)
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
    from .mgopt import run
    arguments = {}
    for name in inspect.signature(run).parameters:
        if name in MGOPT_NEGATED:
            arguments[name] = not getattr(opts, MGOPT_NEGATED[name])
        else:
            arguments[name] = getattr(opts, MGOPT_RENAMED.get(name, name))
    return arguments


def cmd_mgopt(opts) -> int | None:
    code = _launched(opts)
    if code is not None:
        return code
    from .mgopt import run
    result = run(**mgopt_arguments(opts))
    if not _rank_zero():
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
    from .rmntr import run
    l1 = opts.l1 if opts.l1 in ("weights", "all") else opts.l1.split(",")
    result = run(opts.spec, opts.data, hierarchy=opts.hierarchy, levels=opts.levels, beta=opts.beta, l1=l1,
                 gtol=opts.gtol, max_iterations=opts.max_iterations, loss=opts.loss, warmup=opts.warmup,
                 warmup_lr=opts.warmup_lr, model=opts.model, pairing=opts.pairing, seed=opts.seed, out=opts.out, progress=not opts.quiet,
                 radius=opts.radius, kappa_h=opts.kappa_h, coarse_iterations=opts.coarse_iterations,
                 spg_iterations=opts.spg_iterations)
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


def _add_rmntr_parser(commands) -> None:
    rmntr = commands.add_parser("rmntr", help="multilevel proximal trust region for f + beta ||w||_1 (docs/rmntr.md)")
    rmntr.add_argument("spec")
    rmntr.add_argument("--data", default="pinn",
                       help="pinn (the PDE of docs/rmntr.md), spiral, mnist:DIR or npz:FILE (default pinn)")
    rmntr.add_argument("--hierarchy", default="width", choices=("width", "depth"))
    rmntr.add_argument("--levels", type=int, default=2, help="1: the single-level proximal trust region")
    rmntr.add_argument("--beta", type=float, default=1e-4, help="weight of the l1 term")
    rmntr.add_argument("--l1", default="weights", help="penalised parameters: weights, all, or layer names a,b")
    rmntr.add_argument("--gtol", type=float, default=1e-4, help="stop when h <= gtol")
    rmntr.add_argument("--max-iterations", type=int, default=200)
    rmntr.add_argument("--radius", type=float, default=1.0, help="initial trust-region radius")
    rmntr.add_argument("--kappa-h", type=float, default=0.5, help="recurse when h_coarse >= kappa_h h")
    rmntr.add_argument("--coarse-iterations", type=int, default=5, help="iterations per coarse solve")
    rmntr.add_argument("--spg-iterations", type=int, default=25, help="prox-gradient iterations per subproblem")
    rmntr.add_argument("--model", default="hessian", choices=("hessian", "gauss-newton"),
                       help="curvature of the Taylor models (gauss-newton: least-squares losses such as the PINN)")
    rmntr.add_argument("--pairing", default="adjacent", choices=("adjacent", "gradient"),
                       help="width: pair adjacent units or the most strongly connected ones (residual gradients)")
    rmntr.add_argument("--warmup", type=int, default=0, help="Adam steps on f before the method")
    rmntr.add_argument("--warmup-lr", type=float, default=1e-2)
    rmntr.add_argument("--loss", default="cross_entropy", help="for data sets: cross_entropy or mse")
    rmntr.add_argument("--seed", type=int, default=0)
    rmntr.add_argument("--out", default=None, help="run directory (log, final network, export, plots)")
    rmntr.add_argument("--quiet", action="store_true", help="no progress bar")
    rmntr.set_defaults(run=cmd_rmntr)


def cmd_demo(opts) -> None:
    """SensLI on the spiral data (thesis 4.5.1): FNN 2-5-2, full-batch SGD lr 0.2, one layer
    inserted at epoch 450 where the sensitivities say, 1400 more epochs."""
    import itertools
    import time
    from .runtime.runlog import RunDirectoryTaken
    from .sensli import grow
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


DATA_HELP = ("spiral, mnist:DIR (IDX files; with only the 10k t10k-* test files it is split 8,000 train / "
             "2,000 test by --seed) or npz:FILE (x_train, y_train, x_test, y_test)")


def _add_training_options(parser, *, epochs: int, lr: float, batch: int | None = None) -> None:
    parser.add_argument("--data", default="spiral", help=DATA_HELP)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--lr", type=float, default=lr, help="learning rate")
    parser.add_argument("--batch", type=int, default=batch,
                        help=f"mini-batch size (default: {'full batch' if batch is None else batch})")
    parser.add_argument("--loss", default="cross_entropy", help="cross_entropy or mse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="run directory (log, final network, export, plots)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no-export", action="store_true", help="with --out: skip the torch.export artifact")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr and exit status 2, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (hint: {self.prog} --help)\n")


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append '(default: X)' to the help of every option of every subcommand that has a default
    its help does not already state."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)
        elif (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
              and "default" not in (action.help or "")):
            action.help = f"{action.help or ''} (default: {action.default})".strip()


def _add_device_options(parser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available), cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float64"),
                        help="the network's floating-point type; the data are cast to it "
                             "(default: as the network is built, float32 from a spec)")


def _add_parallel_options(parser) -> None:
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="data-parallel ranks on this machine (gloo on the CPU, NCCL on CUDA); "
                             "torchrun --nproc-per-node N -m graphgrow ... works too")
    parser.add_argument("--dist-timeout", type=float, default=300.0, metavar="S",
                        help="seconds a rank waits for the others before the run stops (default 300)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphgrow", description="Networks that change shape while they train.")
    parser.add_argument("--version", action="version", version=f"graphgrow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="check a spec and print its summary")
    check.add_argument("spec")
    check.add_argument("--json", action="store_true", help="summary as JSON")
    check.set_defaults(run=cmd_check)

    show = commands.add_parser("show", help="show a spec: summary and flat YAML, fx code, or DOT")
    show.add_argument("spec")
    form = show.add_mutually_exclusive_group()
    form.add_argument("--code", action="store_true", help="the compiled torch.fx code")
    form.add_argument("--dot", action="store_true", help="the layer graph as Graphviz DOT")
    show.set_defaults(run=cmd_show)

    compile_ = commands.add_parser("compile", help="compile a spec and export it")
    compile_.add_argument("spec")
    compile_.add_argument("-o", "--output", required=True, help="output file (.pt2 or .pt)")
    compile_.add_argument("--format", choices=("export", "torchscript"), default="export")
    compile_.add_argument("--seed", type=int, default=0, help="initialisation seed")
    compile_.add_argument("--weights", help="weights (.pt) to use instead of a fresh initialisation")
    compile_.set_defaults(run=cmd_compile)

    grow = commands.add_parser("grow", help="train while SensLI (or a comparison) inserts layers")
    grow.add_argument("spec")
    _add_training_options(grow, epochs=100, lr=0.1)
    grow.add_argument("--strategy", default="sensli", help="sensli, random, min (LIother) or none")
    grow.add_argument("--insert-every", type=int, default=None, metavar="N",
                      help="try an insertion every N epochs (default, when neither this nor --insert-at is given: "
                           "every epochs // (max-insertions + 1) epochs)")
    grow.add_argument("--insert-at", type=int, nargs="+", default=None, metavar="EPOCH",
                      help="try at the end of these epochs (1 .. epochs-1); not with --insert-every")
    grow.add_argument("--max-insertions", type=int, default=1, metavar="K", help="layers (or widening steps) at most")
    grow.add_argument("--per-step", type=int, default=1, help="layers inserted at once when several pass")
    grow.add_argument("--tau", type=float, default=None, help="threshold (4.18), >= 1; default: always insert")
    grow.add_argument("--norm", default="fro", help="merit norm (fro; conv kernels also B.1a-e names)")
    grow.add_argument("--sample", type=float, default=None, help="sensitivities on a sample (count or fraction)")
    grow.add_argument("--widen", type=int, default=0, metavar="K", help="add the K best neurons instead of layers (4.4)")
    grow.add_argument("--momentum", type=float, default=0.0)
    grow.add_argument("--weight-decay", type=float, default=0.0)
    grow.add_argument("--optimizer", default="sgd",
                      help="sgd, adam or frobenius (the layer-wise preconditioner, docs/preconditioning.md)")
    grow.add_argument("--damping", type=float, default=0.01, help="gamma of the frobenius optimizer (both sides)")
    _add_device_options(grow)
    _add_parallel_options(grow)
    grow.set_defaults(run=cmd_grow)

    sens = commands.add_parser("sensitivities", help="merits of every candidate layer of a network")
    sens.add_argument("spec")
    sens.add_argument("--weights", default=None, help="trained weights (.pt); default: the .pt beside the spec")
    sens.add_argument("--random-weights", action="store_true",
                      help="score a freshly initialised network (from --seed) when no weights exist")
    sens.add_argument("--data", default="spiral", help=DATA_HELP)
    sens.add_argument("--norm", default="fro")
    sens.add_argument("--all-norms", action="store_true", help="also the conv kernel norms B.1a-e")
    sens.add_argument("--loss", default="cross_entropy", help="cross_entropy or mse")
    sens.add_argument("--sample", type=float, default=None)
    sens.add_argument("--seed", type=int, default=0)
    sens.add_argument("--json", action="store_true")
    _add_device_options(sens)
    sens.set_defaults(run=cmd_sensitivities)

    mgopt = commands.add_parser("mgopt", help="multilevel training (MG/Opt) on a hierarchy built by passes")
    mgopt.add_argument("spec")
    _add_training_options(mgopt, epochs=10, lr=0.1, batch=100)
    mgopt.add_argument("--hierarchy", default="depth", help="depth, width, batch or resolution")
    mgopt.add_argument("--levels", type=int, default=2)
    mgopt.add_argument("--kappa", type=float, default=0.5, help="take a coarse correction when |R g|^2 > kappa |g|^2")
    mgopt.add_argument("--K", type=int, default=10, help="coarse SGD steps per correction")
    mgopt.add_argument("--lam", type=float, default=0.0, help="proximal weight lambda of the coarse model")
    mgopt.add_argument("--alpha-bar", type=float, default=None, help="coarse learning rate (default --lr)")
    mgopt.add_argument("--alpha-cgc", type=float, default=1.0, help="coarse-grid correction step")
    mgopt.add_argument("--variant", default="mgopt",
                       help="mgopt (a V-cycle with --levels > 2), no-correction or nested")
    mgopt.add_argument("--pre-smooth", type=int, default=1)
    mgopt.add_argument("--post-smooth", type=int, default=1)
    mgopt.add_argument("--backtracking", type=int, default=0, help="halvings of alpha-cgc tried")
    mgopt.add_argument("--no-descent-check", action="store_true", help="accept ascent corrections too")
    mgopt.add_argument("--schedule", default="constant", help="step sizes: constant or diminishing")
    mgopt.add_argument("--interpolation", default="constant", help="depth prolongation: constant or linear")
    mgopt.add_argument("--restriction", default="half-transpose",
                       help="depth restriction: half-transpose (P^T/2) or injection (coarse block j = fine block 2j)")
    mgopt.add_argument("--min-gap", type=int, default=1,
                       help="fine SGD steps between corrections (0: a V-cycle every iteration)")
    mgopt.add_argument("--same-batch", action="store_true", help="every level of a correction uses the fine batch")
    mgopt.add_argument("--momentum", type=float, default=0.0, help="heavy-ball momentum on every level")
    mgopt.add_argument("--decay", type=float, default=100.0, help="diminishing schedule: alpha / (1 + k / decay)")
    mgopt.add_argument("--nested-epochs", type=int, nargs="+", default=1, metavar="E",
                       help="variant nested: epochs on each coarse level (one count, or one per level, coarsest first)")
    mgopt.add_argument("--work-budget", type=float, default=None,
                       help="stop after this many work units (one = a fine gradient evaluation)")
    mgopt.add_argument("--eval-every", type=int, default=1, help="epochs between full evaluations")
    mgopt.add_argument("--evals-per-epoch", type=int, default=1, help="full evaluations per epoch")
    mgopt.add_argument("--no-log-steps", action="store_true", help="no step records in the log")
    _add_device_options(mgopt)
    _add_parallel_options(mgopt)
    mgopt.set_defaults(run=cmd_mgopt)

    _add_rmntr_parser(commands)

    demo = commands.add_parser("demo", help="the main job: SensLI on the spiral data")
    demo.add_argument("--spec", default=str(DEMO_SPEC))
    demo.add_argument("--out", default=None, help="run directory (default: runs/demo-<time>, new each run)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=1850)
    demo.add_argument("--insert-at", type=int, default=450, metavar="EPOCH")
    demo.set_defaults(run=cmd_demo)
    _show_defaults(parser)
    return parser


#: Python API argument names whose command-line option is spelt differently, per command
_OPTION_NAMES = {"mgopt": {"alpha": "lr"}}


def cli_message(err: GraphgrowError, command: str) -> str:
    """The error's one line, with the Python argument it names shown as the command's option
    (``insert_at`` -> ``--insert-at``) and 'graphgrow' where nothing more precise is known."""
    if err.option and not err.option.startswith("-"):
        err.option = "--" + _OPTION_NAMES.get(command, {}).get(err.option, err.option).replace("_", "-")
    if err.file is None and err.option is None:
        err.option = f"graphgrow {command}"
    return err.format()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = build_parser().parse_args(argv)
    opts.argv = argv
    try:
        code = opts.run(opts)
    except GraphgrowError as err:
        print(cli_message(err, opts.command), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
