"""Training runtime: losses, optimizers, batching, schedules, seeds, hooks, carried optimizer
state, run directory and plots."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from graphgrow import GraphgrowError, Network, graph_from_text
from graphgrow.runtime.plots import plot_run, run_curves
from graphgrow.runtime.runlog import RunLog, read_log
from graphgrow.runtime.splits import batches
from graphgrow.runtime.train import TrainConfig, Trainer, lr_at, train

SMALL_FNN = """
graphgrow: 1
name: small
input: {shape: [2]}
layers:
  - {name: fc1, op: linear, out: 6}
  - {name: act1, op: relu}
  - {name: head, op: linear, out: 2}
"""


def small_network(seed=0):
    return Network.build(graph_from_text(SMALL_FNN), seed=seed)


def blobs(n_train=40, n_test=20, seed=0):
    """Two Gaussian blobs; linearly separable enough to train in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=generator) * 0.5 + (y.float() * 2 - 1).unsqueeze(1)
    return SimpleNamespace(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])


def parameters_of(network):
    return {k: v.clone() for k, v in network.state().items()}


def test_same_seed_same_run_bitwise():
    data = blobs()
    config = TrainConfig(epochs=3, lr=0.1, batch=7, momentum=0.9, seed=5)
    first = train(small_network(), data, config)
    second = train(small_network(), data, config)
    for key, value in first.network.state().items():
        assert torch.equal(value, second.network.state()[key])
    losses = lambda result: [r["loss"] for r in result.records if r["event"] == "step"]
    assert losses(first) == losses(second)
    other = train(small_network(), data, TrainConfig(epochs=3, lr=0.1, batch=7, momentum=0.9, seed=6))
    assert losses(other) != losses(first)  # a different seed shuffles differently


def test_full_batch_sgd_step_matches_hand_computed_update():
    data = blobs()
    network = small_network()
    before = {k: v.clone().requires_grad_(True) for k, v in network.state().items()}
    loss = torch.nn.functional.cross_entropy(
        torch.func.functional_call(network.module, before, (data.x_train,)), data.y_train)
    grads = dict(zip(before, torch.autograd.grad(loss, list(before.values()))))
    train(network, data, TrainConfig(epochs=1, lr=0.3, seed=0))
    for key, value in network.state().items():
        assert torch.allclose(value, before[key].detach() - 0.3 * grads[key], atol=1e-6)


def test_batches_cover_every_sample_once_per_epoch_with_a_short_last_batch():
    generator = torch.Generator().manual_seed(0)
    chunks = list(batches(23, 5, generator))
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(chunks).tolist()) == list(range(23))
    assert list(batches(23, None, generator)) == [slice(None)]


def test_minibatch_run_counts_iterations_and_stops_at_iteration_budget():
    data = blobs(n_train=40)
    result = train(small_network(), data, TrainConfig(epochs=5, batch=8, lr=0.05))
    assert result.iterations == 25 and result.epochs == 5
    capped = train(small_network(), data, TrainConfig(epochs=5, batch=8, lr=0.05, iterations=12))
    assert capped.iterations == 12
    assert capped.epochs == 3  # the third epoch is cut short by the budget


@pytest.mark.parametrize("optimizer,loss", [("sgd", "cross_entropy"), ("adam", "cross_entropy"),
                                            ("sgd", "mse"), ("adam", "mse")])
def test_training_lowers_the_loss(optimizer, loss):
    data = blobs()
    network = small_network()
    result = train(network, data, TrainConfig(epochs=30, lr=0.05 if optimizer == "adam" else 0.2,
                                              optimizer=optimizer, loss=loss, momentum=0.5))
    first_eval = next(r for r in result.records if r["event"] == "eval")
    assert result.final["train"]["loss"] < 0.7 * first_eval["train_loss"]
    assert result.final["test"]["error"] <= 0.2


def test_mse_with_class_targets_uses_one_hot():
    from graphgrow.runtime.splits import loss_fn
    output = torch.tensor([[0.2, 0.7], [1.0, -1.0]])
    target = torch.tensor([1, 0])
    expected = ((output - torch.tensor([[0.0, 1.0], [1.0, 0.0]])) ** 2).mean()
    assert torch.isclose(loss_fn("mse")(output, target), expected)


def test_learning_rate_schedules():
    config = TrainConfig(lr=1.0, schedule="step", step_size=3, gamma=0.5, epochs=10)
    assert [lr_at(config, e) for e in (0, 2, 3, 7)] == [1.0, 1.0, 0.5, 0.25]
    config = TrainConfig(lr=2.0, schedule="exponential", gamma=0.9)
    assert math.isclose(lr_at(config, 2), 2.0 * 0.81)
    config = TrainConfig(lr=1.0, schedule="cosine", epochs=4)
    assert [round(lr_at(config, e), 6) for e in (0, 2, 4)] == [1.0, 0.5, 0.0]
    data = blobs()
    result = train(small_network(), data, TrainConfig(epochs=4, lr=1.0, schedule="step", step_size=2, gamma=0.1))
    seen = sorted({round(r["lr"], 8) for r in result.records if r["event"] == "step"}, reverse=True)
    assert seen == [1.0, 0.1]


def test_bad_settings_and_mismatched_data_raise_user_errors():
    with pytest.raises(GraphgrowError, match="unknown optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(GraphgrowError, match="batch"):
        TrainConfig(batch=0)
    images = SimpleNamespace(x_train=torch.zeros(4, 1, 28, 28), y_train=torch.zeros(4, dtype=torch.long),
                             x_test=None, y_test=None)
    with pytest.raises(GraphgrowError, match="expects \\[2\\]"):
        train(small_network(), images, TrainConfig(epochs=1))


class Recorder:
    def __init__(self):
        self.calls = []

    def on_train_start(self, trainer):
        self.calls.append("start")

    def on_epoch_end(self, trainer):
        self.calls.append(f"epoch{trainer.epoch}")
        if trainer.epoch == 2:
            trainer.request_stop()

    def on_train_end(self, trainer):
        self.calls.append("end")


def test_hooks_are_called_and_can_stop_training():
    recorder = Recorder()
    result = train(small_network(), blobs(), TrainConfig(epochs=10), hooks=[recorder])
    assert recorder.calls == ["start", "epoch1", "epoch2", "end"]
    assert result.epochs == 2


def widened_copy(network):
    """The same network plus an unused extra linear layer: a new architecture that shares every
    old parameter by name."""
    text = SMALL_FNN + "  - {name: spare, op: linear, out: 2, inputs: [act1]}\noutputs: [head]\n"
    state = dict(network.state())
    bigger = Network.build(graph_from_text(text), seed=1)
    full = bigger.state()
    full.update(state)
    return Network.build(bigger.graph, full)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_replace_network_carries_optimizer_state(optimizer):
    data = blobs()
    config = TrainConfig(epochs=2, lr=0.1, momentum=0.9, optimizer=optimizer, batch=10)
    trainer = Trainer(small_network(), data, config)
    trainer.fit()
    old_state = {name: {k: v.clone() if isinstance(v, torch.Tensor) else v
                        for k, v in trainer.optimizer.state[p].items()}
                 for name, p in trainer.network.module.named_parameters()}
    trainer.replace_network(widened_copy(trainer.network))
    new_params = dict(trainer.network.module.named_parameters())
    for name, state in old_state.items():
        carried = trainer.optimizer.state[new_params[name]]
        assert set(carried) == set(state)
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(carried[key]), torch.as_tensor(value))
    assert new_params["spare.weight"] not in trainer.optimizer.state
    assert any(r["event"] == "architecture" for r in trainer.log.records)


def test_carried_momentum_continues_the_same_trajectory():
    """Replacing the network by an identical copy mid-run must not change the run at all
    (momentum kept), while recreating the optimizer (the reference code's defect) does."""
    data = blobs()
    config = TrainConfig(epochs=4, lr=0.1, momentum=0.9)
    reference = train(small_network(), data, config).network.state()

    class SwapAtEpoch2:
        def __init__(self, keep_state):
            self.keep_state = keep_state

        def on_epoch_end(self, trainer):
            if trainer.epoch == 2:
                copy = Network.build(trainer.network.graph, {k: v.clone() for k, v in trainer.network.state().items()})
                trainer.replace_network(copy, carry=None if self.keep_state else (lambda name, p: None))

    kept = train(small_network(), data, config, hooks=[SwapAtEpoch2(True)]).network.state()
    reset = train(small_network(), data, config, hooks=[SwapAtEpoch2(False)]).network.state()
    for key in reference:
        assert torch.equal(kept[key], reference[key])
    assert any(not torch.equal(reset[key], reference[key]) for key in reference)


def test_run_directory_log_network_export_and_plot(tmp_path):
    data = blobs()
    with RunLog(tmp_path / "run") as log:
        result = train(small_network(), data, TrainConfig(epochs=3, batch=16), log=log)
        log.log("insertion", epoch=1, iteration=3, inserted=True)
        log.save_network(result.network)
        exported = log.export(result.network)
    records = read_log(tmp_path / "run")
    kinds = [r["event"] for r in records]
    assert kinds[0] == "start" and kinds[-1] == "insertion"
    assert kinds.count("step") == result.iterations == 9
    assert kinds.count("eval") == 4  # before training and after each epoch
    assert all(json.dumps(r) for r in records)
    from graphgrow.compiler.io import load
    reloaded = load(tmp_path / "run" / "final.yaml")
    for key, value in result.network.state().items():
        assert torch.equal(reloaded.state()[key], value)
    from graphgrow.compiler.export import load_exported
    probe = data.x_test[:5]
    assert torch.allclose(load_exported(exported)(probe), result.network(probe), atol=1e-6)
    curves = run_curves(records)
    assert list(curves["change_iteration"]) == [3.0]
    png = plot_run(records, tmp_path / "run" / "curves.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_directory_refuses_to_overwrite_a_run(tmp_path):
    RunLog(tmp_path).close()
    with pytest.raises(GraphgrowError, match="already holds a run"):
        RunLog(tmp_path)


def test_frobenius_optimizer_in_the_runtime_takes_the_preconditioned_step():
    """optimizer='frobenius' steps exactly like FrobeniusPreconditioner used by hand, and keeps
    working on the network that replaces the current one (rebuilt on the new layers)."""
    from graphgrow.precond import FrobeniusPreconditioner
    data = blobs()
    by_hand = small_network()
    optimizer = FrobeniusPreconditioner(by_hand.module, lr=0.2, damping_in=0.05, damping_out=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(by_hand.module(data.x_train), data.y_train).backward()
        optimizer.step()
    config = TrainConfig(epochs=3, lr=0.2, optimizer="frobenius", damping=0.05)
    trained = train(small_network(), data, config)
    for key, value in trained.network.state().items():
        torch.testing.assert_close(value, by_hand.state()[key], rtol=1e-5, atol=1e-6)

    trainer = Trainer(small_network(), data, TrainConfig(epochs=2, lr=0.2, optimizer="frobenius"))
    trainer.fit()
    old_module = trainer.network.module
    trainer.replace_network(widened_copy(trainer.network))
    assert trainer.optimizer.model is trainer.network.module and not old_module._forward_hooks
    head = dict(trainer.network.module.named_parameters())["head.weight"]
    before = head.detach().clone()
    trainer.step(data.x_train, data.y_train)
    assert not torch.equal(head.detach(), before)
    assert trainer.optimizer.state[head]["step"] == 1  # fresh statistics from the new network's batch


def test_frobenius_optimizer_takes_momentum_and_weight_decay_from_the_config():
    config = TrainConfig(optimizer="frobenius", momentum=0.9, nesterov=True, weight_decay=1e-3)
    trainer = Trainer(small_network(), blobs(), config)
    group = trainer.optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 1e-3)
    with pytest.raises(GraphgrowError, match="damping"):
        TrainConfig(optimizer="frobenius", damping=-1.0)


TINY_LM = """
graphgrow: 1
name: tiny_lm
input: {shape: [6], tokens: 7}
layers:
  - {name: wte, op: embedding, tokens: 7, dim: 8}
  - {name: pos, op: positions, inputs: [input]}
  - {name: wpe, op: embedding, tokens: 6, dim: 8}
  - {name: x, op: add, inputs: [wte, wpe]}
  - {name: attn, op: attention, heads: 2, causal: true}
  - {name: h, op: add, inputs: [x, attn]}
  - {name: logits, op: linear, out: 7}
"""


def next_tokens(n_train=48, n_test=16, seed=0):
    """Sequences counting up modulo 7 from a random start: input the first 6 tokens, targets the
    6 next ones (a language model's data, one class per position)."""
    starts = torch.randint(0, 7, (n_train + n_test, 1), generator=torch.Generator().manual_seed(seed))
    sequences = (starts + torch.arange(7)) % 7
    x, y = sequences[:, :-1], sequences[:, 1:]
    return SimpleNamespace(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])


def test_a_language_model_trains_on_a_class_per_position():
    """Loss and error over every position against an independent computation (log-softmax
    by hand, argmax by position), and training lowers the loss."""
    from graphgrow.runtime.splits import Split, error_count, evaluate, loss_fn
    data = next_tokens()
    network = Network.build(graph_from_text(TINY_LM), seed=0, dtype=torch.float64)
    test = Split(data.x_test, data.y_test)
    with torch.no_grad():
        logits = network.module(data.x_test)
    assert logits.shape == (16, 6, 7)
    picked = logits.gather(2, data.y_test.unsqueeze(2)).squeeze(2)
    expected_loss = float((logits.logsumexp(dim=2) - picked).mean())
    wrong = torch.tensor([[int(logits[b, t].argmax() != data.y_test[b, t]) for t in range(6)] for b in range(16)])
    assert float(loss_fn("cross_entropy")(logits, data.y_test)) == pytest.approx(expected_loss, rel=1e-12)
    assert error_count(logits, data.y_test) == pytest.approx(float(wrong.sum()) / 6, rel=1e-12)
    metrics = evaluate(network, test)
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert metrics["error"] == pytest.approx(float(wrong.double().mean()), rel=1e-12)
    result = train(network, data, TrainConfig(epochs=30, lr=0.01, optimizer="adam", batch=16, seed=0))
    evals = [r for r in result.records if r["event"] == "eval"]
    assert evals[-1]["test_loss"] < 0.5 * evals[0]["test_loss"] and evals[-1]["test_error"] < evals[0]["test_error"]


def test_class_labels_must_match_the_output_positions():
    network = Network.build(graph_from_text(TINY_LM), seed=0)
    data = next_tokens()
    one_per_sample = SimpleNamespace(x_train=data.x_train, y_train=data.y_train[:, 0], x_test=None, y_test=None)
    with pytest.raises(GraphgrowError, match="one per position for an output of shape"):
        train(network, one_per_sample, TrainConfig(epochs=1))
    out_of_range = SimpleNamespace(x_train=data.x_train, y_train=data.y_train + 7, x_test=None, y_test=None)
    with pytest.raises(GraphgrowError, match="outside 0..6"):
        train(network, out_of_range, TrainConfig(epochs=1))


def test_vector_outputs_keep_an_integer_count_of_misclassified_samples():
    from graphgrow.runtime.splits import error_count
    output = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    count = error_count(output, torch.tensor([0, 0, 1]))
    assert count == 2 and isinstance(count, int)
    assert error_count(output, torch.rand(3, 5)) is None  # regression targets of another shape
