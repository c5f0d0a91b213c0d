"""The `graphgrow` command line: subcommands, their options and defaults."""
from __future__ import annotations

import argparse

from .. import __version__
from .commands import (DEMO_SPEC, cmd_check, cmd_compile, cmd_demo, cmd_grow, cmd_mgopt, cmd_rmntr,
                       cmd_sensitivities, cmd_show)


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


def _add_checkpoint_options(parser, command: str) -> None:
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="checkpoint every N optimizer steps (default: every epoch; with --out)")
    parser.add_argument("--resume", default=None, metavar="RUNDIR",
                        help=f"continue an interrupted run from its latest checkpoint, with its options "
                             f"(graphgrow {command} --resume RUNDIR)")
    parser.set_defaults(command_parser=parser)


def _add_rmntr_parser(commands) -> None:
    rmntr = commands.add_parser("rmntr", help="multilevel proximal trust region for f + beta ||w||_1 (docs/rmntr.md)")
    rmntr.add_argument("spec", nargs="?", help="the network (left out with --resume)")
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
    rmntr.add_argument("--model", default="hessian", choices=("hessian", "gauss-newton", "levenberg-marquardt"),
                       help="curvature of the Taylor models (gauss-newton: least-squares losses such as the PINN); "
                            "levenberg-marquardt: the smooth member (beta 0), lambda updates instead of a radius")
    rmntr.add_argument("--rescale-coarse-steps", action="store_true",
                       help="length and predicted reduction of a recursive step from the fine model along it (one HVP)")
    rmntr.add_argument("--lm-lambda", type=float, default=1.0, help="initial lambda of --model levenberg-marquardt")
    rmntr.add_argument("--pairing", default="adjacent", choices=("adjacent", "gradient"),
                       help="width: pair adjacent units or the most strongly connected ones (residual gradients)")
    rmntr.add_argument("--coarse-scaling", default="orthonormal", choices=("orthonormal", "average"),
                       help="width: coarse networks evaluate orthonormal coordinates, or average-scaled weights "
                            "(function-preserving for equal pairs)")
    rmntr.add_argument("--warmup", type=int, default=0, help="Adam steps on f before the method")
    rmntr.add_argument("--warmup-lr", type=float, default=1e-2)
    rmntr.add_argument("--loss", default="cross_entropy", help="for data sets: cross_entropy or mse")
    rmntr.add_argument("--seed", type=int, default=0)
    rmntr.add_argument("--out", default=None, help="run directory (log, final network, export, plots)")
    rmntr.add_argument("--quiet", action="store_true", help="no progress bar")
    rmntr.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                       help="checkpoint every N fine iterations (default: every one; with --out)")
    rmntr.add_argument("--resume", default=None, metavar="RUNDIR",
                       help="continue an interrupted run from its latest checkpoint, with its options "
                            "(graphgrow rmntr --resume RUNDIR)")
    rmntr.set_defaults(run=cmd_rmntr, command_parser=rmntr)


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
    grow.add_argument("spec", nargs="?", help="the network (left out with --resume)")
    _add_training_options(grow, epochs=100, lr=0.1)
    _add_checkpoint_options(grow, "grow")
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
    grow.add_argument("--neurons", choices=("random", "gradmax"), default="random",
                      help="incoming weights of new neurons: random, or gradmax (data-driven, docs/sensli.md)")
    grow.add_argument("--candidates", choices=("all", "layers", "blocks"), default="all",
                      help="what an insertion chooses from: identity layers, copies of residual blocks "
                           "(last layer zero, at block boundaries) or both")
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
    sens.add_argument("--candidates", choices=("all", "layers", "blocks"), default="all",
                      help="score identity layers, copies of residual blocks, or both")
    _add_device_options(sens)
    sens.set_defaults(run=cmd_sensitivities)

    mgopt = commands.add_parser("mgopt", help="multilevel training (MG/Opt) on a hierarchy built by passes")
    mgopt.add_argument("spec", nargs="?", help="the network (left out with --resume)")
    _add_training_options(mgopt, epochs=10, lr=0.1, batch=100)
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
    mgopt.add_argument("--interpolation", default="constant",
                       help="depth prolongation: constant, linear or identity (exact; residual blocks as subgraphs)")
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


