"""The `graphgrow` command line. User mistakes print one line `path:line:col: error: ...`
and exit with status 2; no traceback."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .errors import GraphgrowError

DEMO_SPEC = Path("specs/fnn_spiral.yaml")


def _load_network(spec: str, weights: str | None, seed: int):
    from .io import load
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
    from .compiler import compile_graph
    from .ir import load_graph
    graph = load_graph(opts.spec)
    if opts.code:
        print(compile_graph(graph).print_readable(print_output=False).strip())  # with spec lines
    elif opts.dot:
        print(to_dot(graph))
    else:
        from .io import dump
        print(graph.summary_table())
        print()
        print(dump(graph), end="")


def compile_and_export(spec: str, out: Path, fmt: str, seed: int, weights: str | None = None) -> float:
    """Compile a spec, export it, reload the artifact and return its max abs difference to the
    eager module on a probe batch."""
    from .export import example_input, export, load_exported
    network = _load_network(spec, weights, seed)
    network.module.eval()
    path = export(network.module, network.graph, out, fmt)
    probe = example_input(network.graph, batch=4)
    with torch.no_grad():
        difference = (load_exported(path)(probe) - network.module(probe)).abs().max().item()
    print(f"wrote {path} ({fmt}); reloaded artifact matches the eager module: max |diff| = {difference:.1e}")
    return difference


def cmd_compile(opts) -> None:
    from .export import SUFFIX
    out = Path(opts.output)
    if out.suffix == "":
        out = out.with_suffix(SUFFIX[opts.format])
    compile_and_export(opts.spec, out, opts.format, opts.seed, opts.weights)


def cmd_demo(opts) -> None:
    from .export import FORMATS, SUFFIX
    from .ir import load_graph
    spec = Path(opts.spec)
    graph = load_graph(spec)
    print(graph.summary_table())
    for fmt in FORMATS:
        compile_and_export(str(spec), Path(opts.out) / f"{graph.name}{SUFFIX[fmt]}", fmt, opts.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphgrow", description=__doc__.splitlines()[0])
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

    demo = commands.add_parser("demo", help="the main job on the default spec")
    demo.add_argument("--spec", default=str(DEMO_SPEC))
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        opts.run(opts)
    except GraphgrowError as err:
        print(err.format(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
