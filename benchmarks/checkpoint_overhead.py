"""What checkpoints cost: SensLI growth (``grow``) of the VGG-like CNN on MNIST with a checkpoint at
the end of every epoch (the default with a run directory) against the same run without
checkpoints, and the time to resume.

    PYTHONPATH=. python benchmarks/checkpoint_overhead.py [--repeats 3] [--epochs 3] [--train 2000]
        [--data ../shared/data/mnist]

Both contenders write the same run directory (log, final network, plot; no export); "none" has the
checkpointing hook's ``save`` replaced by a no-op for its runs (the only difference). After an
untimed warm-up run, runs alternate (every epoch, none; none, every epoch; ...), one intra-op thread; reported: the median of the per-pair
ratios of the training time (the ``end`` record's seconds: the training loop with its
checkpoints, sensitivity pass and insertion) and of the whole ``grow`` call, plus the median size
and time of one checkpoint and the share of a run's training time spent in its checkpoint hook
(measured inside the run, so free of the noise between runs on a shared machine). Resume time: ``grow(resume=RUNDIR)`` of a run interrupted after its
second epoch, up to its first training step (reading and verifying the checkpoint, rebuilding the
grown network, the optimizer and the generators, cutting the log), median over the repeats.
MNIST: the 10,000-image test set (IDX files) pooled and split ``train``/500 by seed 0; SGD with
momentum 0.9, lr 0.02, batch 64; one insertion (SensLI, after epoch 1).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from graphgrow.runtime import checkpoint
from graphgrow.runtime.data import mnist
from graphgrow.runtime.train import Trainer
from graphgrow.sensli import grow

SPEC = "specs/cnn_vgg.yaml"


class FirstStep(Exception):
    """Raised at the first training step of a resumed run: resuming is done."""


def options(args) -> dict:
    return dict(epochs=args.epochs, insert_at=[1], max_insertions=1, lr=0.02, momentum=0.9, batch=64,
                export=False, log_steps=True, sens_batch=256)


def timed_grow(data, out: Path, args, checkpoints: bool) -> tuple[float, float, list[float]]:
    """(whole call seconds, training seconds, seconds of each checkpoint written)."""
    real_save, writes = checkpoint.Checkpointer.save, []

    def save(self, trainer):
        began = time.perf_counter()
        written = real_save(self, trainer)
        writes.append(time.perf_counter() - began)
        return written

    checkpoint.Checkpointer.save = save if checkpoints else (lambda self, trainer: None)
    try:
        began = time.perf_counter()
        result = grow(SPEC, data, out=out, **options(args))
        return time.perf_counter() - began, result.summary["final"]["seconds"], writes
    finally:
        checkpoint.Checkpointer.save = real_save


def resume_seconds(data, out: Path, args) -> float:
    """Seconds from grow(resume=out) to the first training step."""
    real_step = Trainer.step

    def stop(self, x, y):
        raise FirstStep

    Trainer.step = stop
    try:
        began = time.perf_counter()
        try:
            grow(data=data, resume=out)
        except FirstStep:
            return time.perf_counter() - began
        raise AssertionError("the resumed run took no step")
    finally:
        Trainer.step = real_step


def interrupted_copy(source: Path, target: Path) -> Path:
    """A copy of a finished run as it was after epoch 2: the checkpoints of epochs 1 and 2 and
    the log up to there."""
    shutil.copytree(source, target)
    root = target / checkpoint.CHECKPOINTS
    newest = sorted(p.name for p in root.glob("step-*"))[-1]
    shutil.rmtree(root / newest)  # the last epoch's checkpoint: as if killed during epoch 3
    (root / checkpoint.LATEST).write_text(sorted(p.name for p in root.glob("step-*"))[-1] + "\n")
    records = (target / "log.jsonl").read_text().splitlines()
    (target / "log.jsonl").write_text("\n".join(r for r in records if '"event": "end"' not in r) + "\n")
    (target / "summary.json").unlink()
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared/data/mnist"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = mnist(args.data, split=(args.train, 500), seed=0)
    work = Path(tempfile.mkdtemp(prefix="checkpoint_overhead-"))
    whole, training, writes, resumes, shares = [], [], [], [], []
    timed_grow(data, work / "warm-up", argparse.Namespace(**{**vars(args), "epochs": 2}), True)  # first-call costs
    for repeat in range(args.repeats):
        pair = {}
        for contender in (("every epoch", "none") if repeat % 2 == 0 else ("none", "every epoch")):
            out = work / f"{contender.replace(' ', '_')}-{repeat}"
            pair[contender] = timed_grow(data, out, args, contender == "every epoch")
        whole.append(pair["every epoch"][0] / pair["none"][0])
        training.append(pair["every epoch"][1] / pair["none"][1])
        writes.extend(pair["every epoch"][2])
        shares.append(sum(pair["every epoch"][2]) / pair["every epoch"][1])
        resumes.append(resume_seconds(data, interrupted_copy(work / f"every_epoch-{repeat}", work / f"cut-{repeat}"), args))
        print(f"repeat {repeat}: training {pair['every epoch'][1]:.2f} s vs {pair['none'][1]:.2f} s, "
              f"whole grow {pair['every epoch'][0]:.2f} s vs {pair['none'][0]:.2f} s, resume {resumes[-1]:.2f} s",
              flush=True)
    size = sum(p.stat().st_size for p in next((work / "every_epoch-0" / checkpoint.CHECKPOINTS).glob("step-*")).iterdir())
    print(f"checkpoint every epoch / none, training time: median ratio {statistics.median(training):.3f} "
          f"(pairs {', '.join(f'{r:.3f}' for r in training)}; goal <= 1.05)")
    print(f"checkpoint every epoch / none, whole grow call: median ratio {statistics.median(whole):.3f}")
    print(f"time inside the checkpoint hook / training time of the same run: median {statistics.median(shares):.4f}")
    print(f"one checkpoint: {size / 1e6:.2f} MB, median {1000 * statistics.median(writes):.1f} ms to write "
          f"({len(writes)} writes)")
    print(f"resume to the first step: median {statistics.median(resumes):.2f} s "
          f"({', '.join(f'{r:.2f}' for r in resumes)})")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
