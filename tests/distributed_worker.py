"""One rank of the data-parallel tests (tests/test_distributed.py starts two of these on
127.0.0.1 with RANK/WORLD_SIZE/MASTER_* set, or runs ``run_scenario`` alone for the
single-process reference). Writes ``rank<R>.pt`` into the directory given as argv[1]."""
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graphgrow.compiler.io import load_network  # noqa: E402
from graphgrow import mgopt  # noqa: E402
from graphgrow.errors import GraphgrowError  # noqa: E402
from graphgrow.runtime.data import spiral  # noqa: E402
from graphgrow.runtime.distributed import DataParallelTrainer, joined  # noqa: E402
from graphgrow.runtime.train import TrainConfig, Trainer  # noqa: E402
from graphgrow.sensli import growth  # noqa: E402

#: name -> (spec, dtype, training settings, growth settings, insertion epoch)
SCENARIOS = {
    "insert": ("fnn_spiral", torch.float64, dict(epochs=60, lr=0.2), dict(insert_at=[30]), 30),
    "insert-float32": ("fnn_spiral", torch.float32, dict(epochs=60, lr=0.2), dict(insert_at=[30]), 30),
    "momentum": ("fnn_spiral_deep", torch.float64, dict(epochs=6, lr=0.1, batch=64, momentum=0.9),
                 dict(insert_at=[3]), 3),
    "adam": ("fnn_spiral_deep", torch.float64, dict(epochs=6, lr=0.01, batch=64, optimizer="adam"),
             dict(insert_at=[3]), 3),
    "widen": ("fnn_spiral_deep", torch.float64, dict(epochs=6, lr=0.1, batch=64, momentum=0.9),
              dict(insert_at=[3], widen=2), 3),
}
#: two candidate positions, so that a contrary rank can pick another one
CONTRARY = ("fnn_spiral_deep", torch.float64, dict(epochs=4, lr=0.2), dict(insert_at=[2]), 2)


class Capture:
    """Keeps the parameters and optimizer state right after the growth event and at the end."""

    def __init__(self, event_epoch: int):
        self.event_epoch, self.taken = event_epoch, {}

    def snapshot(self, trainer) -> dict:
        state = {n: p.detach().clone() for n, p in trainer.network.module.named_parameters()}
        names = {id(p): n for n, p in trainer.network.module.named_parameters()}
        optimizer = {f"{names[id(p)]}:{k}": v.clone() for p, st in trainer.optimizer.state.items()
                     for k, v in st.items() if isinstance(v, torch.Tensor)}
        return {"params": state, "optimizer": optimizer}

    def on_epoch_end(self, trainer) -> None:
        if trainer.epoch == self.event_epoch:
            self.taken["after_growth"] = self.snapshot(trainer)

    def on_train_end(self, trainer) -> None:
        self.taken["end"] = self.snapshot(trainer)


def run_scenario(name: str, parallel=None, hook_factory=growth.GrowthHook) -> dict:
    spec, dtype, settings, grow_settings, event = SCENARIOS[name] if name in SCENARIOS else CONTRARY
    network = load_network(str(ROOT / "specs" / f"{spec}.yaml"), 0).to(dtype=dtype)
    config = TrainConfig(log_steps=False, **settings)
    hook, capture = hook_factory(**grow_settings), Capture(event)
    options = dict(hooks=[hook, capture])
    trainer = (Trainer(network, spiral(0), config, **options) if parallel is None else
               DataParallelTrainer(network, spiral(0), config, data_parallel=parallel, **options))
    result = trainer.fit()
    return {**capture.taken, "positions": [e["positions"] for e in hook.insertions], "final": result.final}


class Contrary(growth.GrowthHook):
    """Rank 1 picks the candidate with the smallest merit instead of the largest."""

    def __init__(self, **options):
        super().__init__(**options)
        self.strategy = "min"


def run_mgopt() -> dict:
    """MG/Opt on a depth hierarchy (alone, or as a rank of the process group already joined)."""
    result = mgopt.run(str(ROOT / "specs" / "resnet_ode.yaml"), "spiral", hierarchy="depth", levels=2, epochs=1,
                       batch=100, K=2, kappa=0.1, lam=0.1, dtype="float64", export=False, log_steps=False)
    return {"params": {n: p.detach().clone() for n, p in result.network.module.named_parameters()},
            "corrections": result.summary["final"]["corrections"], "final": result.summary["final"]["train"]}


def main() -> None:
    out = Path(sys.argv[1])
    results = {}
    with joined(torch.device("cpu"), timeout=20.0) as parallel:
        for name in SCENARIOS:
            results[name] = run_scenario(name, parallel)
        results["mgopt"] = run_mgopt()
        began = time.monotonic()
        try:
            run_scenario("contrary", parallel, Contrary if parallel.rank == 1 else growth.GrowthHook)
            results["disagreement"] = None
        except GraphgrowError as error:
            results["disagreement"] = {"message": str(error), "seconds": time.monotonic() - began}
        torch.save(results, out / f"rank{parallel.rank}.pt")
        if "dead" in sys.argv[2:]:
            dead_rank(parallel, out)


def dead_rank(parallel, out: Path) -> None:
    """Rank 1 dies in the middle of training; rank 0 must stop with a GraphgrowError."""
    class Die:
        def on_epoch_end(self, trainer):
            if parallel.rank == 1 and trainer.epoch == 2:
                os._exit(3)
    began = time.monotonic()
    network = load_network(str(ROOT / "specs" / "fnn_spiral.yaml"), 0)
    try:
        DataParallelTrainer(network, spiral(0), TrainConfig(epochs=50, lr=0.2, log_steps=False),
                            data_parallel=parallel, hooks=[Die()]).fit()
        outcome = "finished"
    except GraphgrowError as error:
        outcome = str(error)
    (out / f"dead{parallel.rank}.txt").write_text(f"{time.monotonic() - began:.1f}\n{outcome}")
    os._exit(0)  # the group lost a member: leave without the collective shutdown


if __name__ == "__main__":
    main()
