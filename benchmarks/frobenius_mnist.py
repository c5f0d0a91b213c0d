"""Thesis chapter 5 experiments (B.4) on the MNIST 10k set split 8,000/2,000, reduced.

Preconditioned SGD (Frobenius-type, second moment, recomputed every iteration, (5.15)) against
plain SGD with fixed learning rates; a small learning-rate grid per method, the champion is the run
with the lowest mean training loss over the last 10% of iterations. Writes loss-vs-iteration and
loss-vs-time plots, and for the preconditioned champion its gradient norms and covariance spectra.

    PYTHONPATH=. python benchmarks/frobenius_mnist.py --experiment all
    PYTHONPATH=. python benchmarks/frobenius_mnist.py --experiment autoencoder --iterations 300 \
        --sgd-lrs 1.0 --precond-lrs 0.1 --labels sampled   # longer, Monte-Carlo labels as the thesis's KFAC
"""
import argparse
import math
import os
import time
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from graphgrow.runtime.data import mnist  # noqa: E402
from graphgrow.errors import GraphgrowError  # noqa: E402
from graphgrow.precond import FrobeniusPreconditioner  # noqa: E402
from graphgrow.precond.diagnostics import plot_gradient_norms, plot_spectra  # noqa: E402

REPORT_DIR = os.path.join(os.path.dirname(__file__), "reports", "frobenius")


def feedforward(widths, activation, seed):
    torch.manual_seed(seed)
    layers = [nn.Flatten()]
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


EXPERIMENTS = {
    # reduced from B.4: fewer iterations (8k training images) and a few learning rates per method
    "relu": dict(widths=[784, 100, 100, 100, 10], activation=nn.ReLU, batch=100, damping=0.01, autoencoder=False,
                 iterations=400, sgd=[1.0, 0.3, 0.1], precond=[0.03, 0.01, 0.003]),
    "autoencoder": dict(widths=[784, 1000, 500, 250, 30, 250, 500, 1000, 784], activation=nn.Sigmoid, batch=1000,
                        damping=0.001, autoencoder=True, iterations=100, sgd=[3.0, 1.0], precond=[0.1, 0.03]),
    "sigmoid": dict(widths=[784, 100, 10], activation=nn.Sigmoid, batch=1000, damping=0.001, autoencoder=False,
                    iterations=240, sgd=[3.0, 1.0, 0.3], precond=[0.3, 0.1, 0.03]),
}


def train(setting, data, method, lr, seed=0):
    """Train one run; return (losses per iteration, wall seconds per iteration, optimizer); the
    process's CPU seconds per iteration are in ``optimizer.cpu_clock`` (on a shared machine the
    wall clock counts other jobs' time too)."""
    model = feedforward(setting["widths"], setting["activation"], seed)
    loss_fn = nn.MSELoss() if setting["autoencoder"] else nn.CrossEntropyLoss()
    if method == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        optimizer = FrobeniusPreconditioner(model, lr=lr, moment="second", damping_in=setting["damping"],
                                            damping_out=setting["damping"], labels=setting["labels"], loss=loss_fn,
                                            track_diagnostics=True, spectrum_interval=10)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = data.x_train, data.y_train
    losses, clock, cpu = [], [], []
    order = torch.randperm(len(x_train), generator=generator)
    position, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for _ in range(setting["iterations"]):
        if position + setting["batch"] > len(x_train):
            order, position = torch.randperm(len(x_train), generator=generator), 0
        index = order[position:position + setting["batch"]]
        position += setting["batch"]
        x = x_train[index]
        target = x.flatten(1) if setting["autoencoder"] else y_train[index]
        optimizer.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        try:
            optimizer.step()
        except GraphgrowError:  # diverged: the run is recorded as failed from here on
            losses += [math.inf] * (setting["iterations"] - len(losses))
            break
        losses.append(float(loss))
        clock.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        if not math.isfinite(losses[-1]):
            losses += [math.inf] * (setting["iterations"] - len(losses))
            break
    optimizer.cpu_clock = cpu
    return losses, clock, optimizer


def loss_at_time(losses, clock, when, window):
    """The moving-average loss at the last iteration finished by time ``when``."""
    finished = [index for index, moment in enumerate(clock) if moment <= when]
    return smooth(losses, window)[finished[-1]] if finished else float("nan")


def tail_loss(losses):
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def smooth(values, window):
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def run_experiment(name, setting, data):
    print(f"\n## {name}: widths {setting['widths']}, batch {setting['batch']}, gamma {setting['damping']}, "
          f"labels {setting['labels']}, "
          f"{setting['iterations']} iterations\n\n| method | lr | final loss (mean last 10%) | s/iteration |\n|---|---|---|---|")
    champions = {}
    for method in ("sgd", "precond"):
        best = None
        for lr in setting[method]:
            losses, clock, optimizer = train(setting, data, method, lr, setting["seed"])
            score = tail_loss(losses)
            per_iteration = clock[-1] / len(clock) if clock else float("nan")
            print(f"| {method} | {lr} | {score:.4f} | {per_iteration:.4f} |", flush=True)
            if best is None or score < best[0]:
                best = (score, lr, losses, clock, optimizer)
        champions[method] = best
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, setting["iterations"] // 20)
    for method, (score, lr, losses, clock, _) in champions.items():
        label = f"{'SGD' if method == 'sgd' else 'Frobenius-type'} lr={lr}"
        finite = [value for value in losses if math.isfinite(value)]
        axes[0].semilogy(smooth(finite, window), label=label)
        axes[1].semilogy(clock[:len(finite)], smooth(finite, window)[:len(clock)], label=label)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("wall time (s, one thread)")
    for axis in axes:
        axis.set_ylabel(f"training loss (moving average, window {window})")
        axis.legend()
    figure.suptitle(f"MNIST 8k: {name} — champions")
    figure.tight_layout()
    figure.savefig(os.path.join(REPORT_DIR, f"{name}{setting['tag']}_loss.png"), dpi=110)
    plt.close(figure)
    diagnostics = champions["precond"][4].diagnostics
    plot_gradient_norms(diagnostics, os.path.join(REPORT_DIR, f"{name}{setting['tag']}_gradient_norms.png"),
                        f"{name}: preconditioned champion")
    plot_spectra(diagnostics, os.path.join(REPORT_DIR, f"{name}{setting['tag']}_spectra.png"), f"{name}: covariance spectra")
    print(f"\nchampions: SGD lr={champions['sgd'][1]} loss {champions['sgd'][0]:.4f}; "
          f"preconditioned lr={champions['precond'][1]} loss {champions['precond'][0]:.4f}")
    sgd, precond = champions["sgd"], champions["precond"]
    print(f"paths of the preconditioned champion's last refresh: {precond[4].paths}")
    for clock_name, sgd_clock, precond_clock in (("wall", sgd[3], precond[3]),
                                                  ("CPU", sgd[4].cpu_clock, precond[4].cpu_clock)):
        when = sgd_clock[-1]
        print(f"at SGD's final {clock_name} time {when:.1f} s ({when / len(sgd_clock):.4f} s/iteration; "
              f"preconditioned {precond_clock[-1] / len(precond_clock):.4f} s/iteration): moving-average loss "
              f"SGD {loss_at_time(sgd[2], sgd_clock, when, window):.4f}, preconditioned "
              f"{loss_at_time(precond[2], precond_clock, when, window):.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", default="/work/shared/data/mnist")
    parser.add_argument("--experiment", choices=[*EXPERIMENTS, "all"], nargs="+", default=["all"])
    parser.add_argument("--iterations", type=int, help="override the experiment's number of iterations")
    parser.add_argument("--tag", default="", help="appended to the names of the plots written")
    parser.add_argument("--labels", choices=["true", "sampled"], default="true",
                        help="pre-activation gradient samples from the training labels or from labels drawn from "
                             "the model (Monte-Carlo Fisher, as BackPACK's KFAC in the thesis runs)")
    parser.add_argument("--sgd-lrs", type=float, nargs="+", help="override the SGD learning-rate grid")
    parser.add_argument("--precond-lrs", type=float, nargs="+", help="override the preconditioned grid")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    os.makedirs(REPORT_DIR, exist_ok=True)
    data = mnist(args.mnist, split=(8000, 2000), seed=0)
    for name in EXPERIMENTS if "all" in args.experiment else args.experiment:
        setting = dict(EXPERIMENTS[name])
        setting["labels"], setting["tag"], setting["seed"] = args.labels, args.tag, args.seed
        for key, value in (("iterations", args.iterations), ("sgd", args.sgd_lrs), ("precond", args.precond_lrs)):
            if value is not None:
                setting[key] = value
        run_experiment(name, setting, data)


if __name__ == "__main__":
    main()
