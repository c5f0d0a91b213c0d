"""The `graphgrow` command line. User mistakes print one line `path:line:col: error: ...`
and exit with status 2; no traceback."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .errors import GraphgrowError
from .runtime.checkpoint import RunInterrupted

# the repository's spec, found from the package (an editable install), so the demo runs from any directory
DEMO_SPEC = Path(__file__).resolve().parent.parent / "specs" / "fnn_spiral.yaml"


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
    from .compiler.export import example_input, export, load_exported
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


def _print_growth(result) -> None:
    """Where a growth run inserted, the loss before and after, and the final metrics."""
    for event in result.insertions:
        print(f"epoch {event['epoch']}: inserted at {', '.join(event['positions'])}: "
              f"train loss {event['loss_before']:.4f} before, {event['loss_after']:.4f} after; "
              f"{event['params_before']} -> {event['params_after']} parameters")
    if not result.insertions:
        print("no insertion")
    final = result.summary["final"]
    splits = "; ".join(f"{split} loss {final[split]['loss']:.4f}"
                       + (f", error {final[split]['error']:.3f}" if final[split].get("error") is not None else "")
                       for split in ("train", "test") if final.get(split))
    print(f"final: {splits}; {final['params']} parameters, {final['epochs']} epochs in {final['seconds']:.1f} s")
    if result.out is not None:
        print(f"run directory: {result.out} (log.jsonl, summary.json, final.yaml/.pt, model.pt2, curves.png)")


def cmd_grow(opts) -> None:
    from .sensli import grow
    options = dict(spec=opts.spec, data=opts.data, strategy=opts.strategy, insert_every=opts.insert_every,
                   insert_at=opts.insert_at, max_insertions=opts.max_insertions, tau=opts.tau,
                   per_step=opts.per_step, norm=opts.norm, epochs=opts.epochs, lr=opts.lr, batch=opts.batch,
                   momentum=opts.momentum, weight_decay=opts.weight_decay, optimizer=opts.optimizer,
                   damping=opts.damping, loss=opts.loss, sample=opts.sample, widen=opts.widen, out=opts.out,
                   seed=opts.seed, checkpoint_every=opts.checkpoint_every)
    result = grow(**_checked(_resume_options(opts, options)), progress=not opts.quiet)
    _print_growth(result)


def _resume_options(opts, options: dict) -> dict:
    """``options`` for a fresh run; with --resume only those given on the command line (the
    rest come from the run's checkpoint), plus ``resume``."""
    if opts.resume is None:
        return options
    unset = object()  # argparse keeps a namespace's values where no option was given
    given = vars(opts.command_parser.parse_known_args(opts.command_argv, argparse.Namespace(
        **{dest: unset for dest in vars(opts)}))[0])
    return {**{k: v for k, v in options.items() if given.get(k, unset) is not unset}, "resume": opts.resume}


def _checked(options: dict) -> dict:
    """``options``; when resuming, each one given must have the run's value (also a default's)."""
    if "resume" in options:
        from .runtime.checkpoint import check_options, load_checkpoint
        rundir = options["resume"]
        check_options(load_checkpoint(rundir).meta["options"],
                      {k: v for k, v in options.items() if k not in ("spec", "out", "resume")}, rundir)
    return options


def _add_checkpoint_options(parser, command: str) -> None:
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="checkpoint every N optimizer steps (default: every epoch; with --out)")
    parser.add_argument("--resume", default=None, metavar="RUNDIR",
                        help=f"continue an interrupted run from its latest checkpoint, with its options "
                             f"(graphgrow {command} --resume RUNDIR)")
    parser.set_defaults(command_parser=parser)


def cmd_sensitivities(opts) -> None:
    from .compiler.io import load_network
    from .runtime.data import load_data
    from .sensli import sensitivities
    network = load_network(opts.spec, opts.seed, opts.weights)
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


def cmd_mgopt(opts) -> None:
    from .mgopt import run
    options = dict(spec=opts.spec, data=opts.data, hierarchy=opts.hierarchy, levels=opts.levels, kappa=opts.kappa,
                   K=opts.K, lam=opts.lam, lr=opts.lr, alpha_bar=opts.alpha_bar, alpha_cgc=opts.alpha_cgc,
                   variant=opts.variant, epochs=opts.epochs, batch=opts.batch, loss=opts.loss,
                   pre_smooth=opts.pre_smooth, post_smooth=opts.post_smooth, backtracking=opts.backtracking,
                   no_descent_check=opts.no_descent_check, schedule=opts.schedule,
                   interpolation=opts.interpolation, out=opts.out, seed=opts.seed,
                   checkpoint_every=opts.checkpoint_every)
    options = _resume_options(opts, options)
    if "lr" in options:
        options["alpha"] = options.pop("lr")
    if "no_descent_check" in options:
        options["descent_check"] = not options.pop("no_descent_check")
    result = run(**_checked(options), progress=not opts.quiet)
    summary, final = result.summary, result.summary["final"]
    print(f"{summary['variant']} on a {summary['hierarchy']} hierarchy, levels {', '.join(summary['levels'])}")
    print(f"{final['iterations']} fine iterations, {final['corrections']} coarse corrections taken "
          f"({final['rejected']} rejected), {final['work']:.1f} work units, {final['train_time']:.1f} s")
    print(f"final: train loss {final['train']['loss']:.4g}"
          + (f", test loss {final['test']['loss']:.4g}" if final.get("test") else ""))
    if result.out is not None:
        print(f"run directory: {result.out}")


def cmd_demo(opts) -> None:
    """SensLI on the spiral data (thesis 4.5.1): FNN 2-5-2, full-batch SGD lr 0.2, one layer
    inserted at epoch 450 where the sensitivities say, 1400 more epochs."""
    import time
    from .sensli import grow
    opts.out = opts.out or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    print(f"SensLI demo: {opts.spec} on the spiral data; insertion at epoch {opts.insert_at} of {opts.epochs}")
    result = grow(opts.spec, "spiral", strategy="sensli", insert_at=[opts.insert_at], max_insertions=1,
                  epochs=opts.epochs, lr=0.2, out=opts.out, seed=opts.seed, progress=True, log_steps=False)
    _print_growth(result)


def _add_training_options(parser, *, epochs: int, lr: float) -> None:
    parser.add_argument("--data", default="spiral", help="spiral, mnist:DIR or npz:FILE (default spiral)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--lr", type=float, default=lr, help="learning rate")
    parser.add_argument("--batch", type=int, default=None, help="mini-batch size (default: full batch)")
    parser.add_argument("--loss", default="cross_entropy", help="cross_entropy or mse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="run directory (log, final network, export, plots)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphgrow", description="Networks that change shape while they train.")
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
    grow.add_argument("spec", nargs="?", help="the network (left out with --resume)")
    _add_training_options(grow, epochs=100, lr=0.1)
    _add_checkpoint_options(grow, "grow")
    grow.add_argument("--strategy", default="sensli", help="sensli, random, min (LIother) or none")
    grow.add_argument("--insert-every", type=int, default=None, metavar="N", help="try an insertion every N epochs")
    grow.add_argument("--insert-at", type=int, nargs="+", default=None, metavar="EPOCH", help="try at these epochs")
    grow.add_argument("--max-insertions", type=int, default=1, metavar="K")
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
    grow.set_defaults(run=cmd_grow)

    sens = commands.add_parser("sensitivities", help="merits of every candidate layer of a network")
    sens.add_argument("spec")
    sens.add_argument("--weights", default=None, help="trained weights (.pt); default: beside the spec")
    sens.add_argument("--data", default="spiral", help="spiral, mnist:DIR or npz:FILE")
    sens.add_argument("--norm", default="fro")
    sens.add_argument("--all-norms", action="store_true", help="also the conv kernel norms B.1a-e")
    sens.add_argument("--loss", default="cross_entropy", help="cross_entropy or mse")
    sens.add_argument("--sample", type=float, default=None)
    sens.add_argument("--seed", type=int, default=0)
    sens.add_argument("--json", action="store_true")
    sens.set_defaults(run=cmd_sensitivities)

    mgopt = commands.add_parser("mgopt", help="multilevel training (MG/Opt) on a hierarchy built by passes")
    mgopt.add_argument("spec", nargs="?", help="the network (left out with --resume)")
    _add_training_options(mgopt, epochs=10, lr=0.1)
    _add_checkpoint_options(mgopt, "mgopt")
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
    mgopt.set_defaults(run=cmd_mgopt)

    demo = commands.add_parser("demo", help="the main job: SensLI on the spiral data")
    demo.add_argument("--spec", default=str(DEMO_SPEC))
    demo.add_argument("--out", default=None, help="run directory (default: runs/demo-<time>, new each run)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=1850)
    demo.add_argument("--insert-at", type=int, default=450, metavar="EPOCH")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = build_parser().parse_args(argv)
    opts.command_argv = argv[argv.index(opts.command) + 1:]
    try:
        opts.run(opts)
    except GraphgrowError as err:
        print(err.format(), file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        print(stop, file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
