"""The trainer on real images: learning, exact resume, stop, divergence, schedulers, run folder."""
import json
import logging
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from core import events as ev
from core import choices, models, resources, trainer
from core.checkpoints import load_checkpoint
from core.config import RunConfig
from core.errors import ConfigError, ModelError
from core.trainer import fit


def _collect():
    seen = []
    return seen, seen.append


def _of(kind, seen):
    return [e for e in seen if isinstance(e, kind)]


def _script_val_accuracy(monkeypatch, values):
    """Make each epoch's validation accuracy the next of ``values``, so what "best" and "no
    improvement" mean is fixed by the test; the final test-split report stays real."""
    real = trainer.evaluate
    scripted = iter(values)

    def evaluate(model, loader, loss_fn, device, precision="fp32", class_names=None, sample_ids=None):
        out = real(model, loader, loss_fn, device, precision, class_names, sample_ids)
        if class_names is None:   # the per-epoch validation (the final report asks for class names)
            out["accuracy"] = next(scripted)
        return out

    monkeypatch.setattr(trainer, "evaluate", evaluate)


def _weights(path):
    return load_checkpoint(path)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_tutorial_net_beats_chance_clearly_on_the_embedded_sample(tmp_path, session_data_dir):
    """The issue's 'done when': the tutorials' net, a few CPU epochs, >= 30 % on 10 classes."""
    cfg = RunConfig.from_dict({"model": {"name": "tutorial_net"}, "epochs": 6, "device": "cpu",
                               "data": {"batch_size": 32}, "optim": {"lr": 0.02}, "seed": 0})
    seen, sink = _collect()
    result = fit(cfg, on_event=sink, runs_dir=tmp_path, data_dir=session_data_dir)
    assert result.status == ev.FINISHED, result.message
    evaluated = [e for e in seen if isinstance(e, ev.Evaluated)]
    assert evaluated and evaluated[0].split == "test"
    assert evaluated[0].accuracy >= 0.30, f"test accuracy {evaluated[0].accuracy:.1%}"
    report = json.loads((result.run_dir / "eval.json").read_text())
    assert sum(map(sum, report["confusion"])) == 1000   # 100 test images per class
    kinds = [e.kind for e in seen]
    assert kinds[0] == "StatusChanged" and kinds[-1] == "RunFinished"
    assert kinds.index("RunStarted") < kinds.index("EpochEnded") < kinds.index("Evaluated")
    assert sum(isinstance(e, ev.EpochEnded) for e in seen) == 6


@pytest.mark.parametrize("in_memory", ["on", "off"])
def test_resume_gives_the_same_weights_as_one_go(tmp_path, tiny_config, in_memory):
    tiny_config.data.in_memory = in_memory
    tiny_config.data.num_workers = 0
    tiny_config.optim.scheduler = "cosine"
    one_go = fit(tiny_config, runs_dir=tmp_path / "a")
    assert one_go.status == ev.FINISHED, one_go.message

    epochs_seen = []
    stopped = fit(tiny_config, runs_dir=tmp_path / "b",
                  on_event=lambda e: epochs_seen.append(e) if isinstance(e, ev.EpochEnded) else None,
                  should_stop=lambda: len(epochs_seen) >= 1)
    assert stopped.status == ev.STOPPED and stopped.epochs_completed == 1
    resumed = fit(tiny_config, resume_from=stopped.run_dir / "last.pth")
    assert resumed.status == ev.FINISHED, resumed.message
    assert resumed.run_dir == stopped.run_dir

    _assert_same_weights(_weights(one_go.run_dir / "last.pth"), _weights(resumed.run_dir / "last.pth"))


@pytest.mark.parametrize("in_memory, accumulation, scheduler", [
    ("on", 1, "cosine"), pytest.param("off", 1, "cosine", marks=pytest.mark.slow),
    ("off", 2, "onecycle"),   # the stop cuts an accumulation group in two; a per-step scheduler
], ids=["in-memory", "dataloader", "dataloader-accumulation-onecycle"])
def test_a_stop_in_the_middle_of_an_epoch_resumes_exactly(tmp_path, tiny_config, monkeypatch, in_memory,
                                                         accumulation, scheduler):
    """The DataLoader path augments with the global RNG as a batch is fetched: the stop must be
    taken, and the RNG state saved, before that fetch, or the resumed epoch sees other crops."""
    monkeypatch.setattr("core.trainer.REPORT_EVERY_S", 0.0)   # a BatchEnded for every batch
    tiny_config.data.in_memory = in_memory
    tiny_config.data.num_workers = 0
    tiny_config.optim.accumulation_steps = accumulation
    tiny_config.optim.scheduler = scheduler
    one_go = fit(tiny_config, runs_dir=tmp_path / "a")
    assert one_go.status == ev.FINISHED, one_go.message

    seen, sink = _collect()
    per_epoch = []

    def should_stop():   # 3 batches into epoch 2
        started = _of(ev.RunStarted, seen)
        if started and not per_epoch:
            per_epoch.append(started[0].batches_per_epoch)
        return bool(per_epoch) and len(_of(ev.BatchEnded, seen)) >= per_epoch[0] + 3

    stopped = fit(tiny_config, runs_dir=tmp_path / "b", on_event=sink, should_stop=should_stop)
    assert stopped.status == ev.STOPPED
    ckpt = load_checkpoint(stopped.run_dir / "last.pth")
    assert (ckpt["epoch"], ckpt["batches_done"]) == (1, 3)
    assert (ckpt["partial_epoch"]["grads"] is not None) == (accumulation == 2)   # 3 = one group and a half
    resumed = fit(tiny_config, resume_from=stopped.run_dir / "last.pth")
    assert resumed.status == ev.FINISHED, resumed.message
    _assert_same_weights(_weights(one_go.run_dir / "last.pth"), _weights(resumed.run_dir / "last.pth"))
    # the epoch's running sums were kept too: the resumed epoch reports the same training loss
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in one_go.history]


def test_resuming_with_more_epochs_replans_cosine_from_the_current_rate(tmp_path, tiny_config):
    """--resume ... --epochs N with N larger: cosine goes on falling from where it was (it would
    otherwise climb back up after the end of its old plan)."""
    tiny_config.optim.scheduler = "cosine"
    tiny_config.epochs = 3
    done = []
    stopped = fit(tiny_config, runs_dir=tmp_path, should_stop=lambda: bool(done),
                  on_event=lambda e: done.append(e) if isinstance(e, ev.EpochEnded) else None)
    assert stopped.status == ev.STOPPED and stopped.epochs_completed == 1
    rate_at_stop = load_checkpoint(stopped.run_dir / "last.pth")["optimizer"]["param_groups"][0]["lr"]
    tiny_config.epochs = 5
    longer = fit(tiny_config, resume_from=stopped.run_dir / "last.pth")
    assert longer.status == ev.FINISHED, longer.message
    rates = [row["lr"] for row in longer.history[1:]]
    assert len(rates) == 4 and rates[0] == pytest.approx(rate_at_stop)
    assert all(a > b > 0 for a, b in zip(rates, rates[1:])), rates   # falling, never back up, never 0

    # A finished run extended: its plan has reached 0, so it goes on from its last epoch's rate.
    last_rate = longer.history[-1]["lr"]
    tiny_config.epochs = 7
    extended = fit(tiny_config, resume_from=longer.run_dir / "last.pth")
    assert extended.status == ev.FINISHED and extended.epochs_completed == 7, extended.message
    rates = [row["lr"] for row in extended.history[5:]]
    assert rates[0] == pytest.approx(last_rate) and last_rate > rates[1] > 0, rates


def test_resuming_with_more_epochs_extends_onecycle(tmp_path, tiny_config, monkeypatch):
    """OneCycle was planned for the old number of steps and failed with "Tried to step 15 times"
    when resumed for more epochs; re-planned, its rate carries on from where it was."""
    monkeypatch.setattr("core.trainer.REPORT_EVERY_S", 0.0)
    tiny_config.optim.scheduler = "onecycle"
    seen, sink = _collect()
    stopped = fit(tiny_config, runs_dir=tmp_path, on_event=sink,
                  should_stop=lambda: bool(_of(ev.EpochEnded, seen)))
    assert stopped.status == ev.STOPPED and stopped.epochs_completed == 1
    rate_at_stop = load_checkpoint(stopped.run_dir / "last.pth")["optimizer"]["param_groups"][0]["lr"]
    tiny_config.epochs = 3
    seen.clear()
    longer = fit(tiny_config, resume_from=stopped.run_dir / "last.pth", on_event=sink)
    assert longer.status == ev.FINISHED and longer.epochs_completed == 3, longer.message
    rates = [e.lr for e in _of(ev.BatchEnded, seen)]
    assert len(rates) == 2 * 7 and rates[0] <= rate_at_stop    # past its peak: annealing on
    assert all(a >= b for a, b in zip(rates, rates[1:])), " ".join(f"{r:.3g}" for r in rates)

    # The cycle has ended (the rate is at its floor): one more epoch is one more cycle, as fitting
    # "one more cycle" does: from peak / 25 up to at most the peak and down again.
    tiny_config.epochs = 4
    seen.clear()
    extended = fit(tiny_config, resume_from=longer.run_dir / "last.pth", on_event=sink)
    assert extended.status == ev.FINISHED and extended.epochs_completed == 4, extended.message
    more = [e.lr for e in _of(ev.BatchEnded, seen)]
    peak = tiny_config.optim.lr
    assert len(more) == 7 and more[0] == pytest.approx(peak / 25) and max(more) <= peak, more
    assert more[-1] < more[0]


def test_stop_takes_effect_within_one_batch_and_leaves_a_usable_checkpoint(tmp_path, tiny_config):
    calls = {"n": 0}

    def should_stop():  # allow 3 batches of the first epoch, then ask to stop
        calls["n"] += 1
        return calls["n"] > 4   # 1 check before the epoch + 3 before batches

    result = fit(tiny_config, runs_dir=tmp_path, should_stop=should_stop)
    assert result.status == ev.STOPPED
    ckpt = load_checkpoint(result.run_dir / "last.pth")
    assert ckpt["epoch"] == 0 and ckpt["batches_done"] == 3
    resumed = fit(tiny_config, resume_from=result.run_dir / "last.pth")
    assert resumed.status == ev.FINISHED and resumed.epochs_completed == 2


def test_divergence_stops_with_a_learning_rate_hint(tmp_path, tiny_config):
    tiny_config.optim.lr = 100.0   # the largest allowed (config.MAX_LR): it still diverges
    tiny_config.optim.momentum = 0.0
    tiny_config.optim.weight_decay = 0.0
    result = fit(tiny_config, runs_dir=tmp_path)
    assert result.status == ev.FAILED
    msg = result.message.lower()
    assert "learning rate" in msg and ("nan" in msg or "inf" in msg), result.message


def test_bad_dataset_fails_cleanly_with_the_reason(tmp_path, tiny_config):
    tiny_config.data.location = str(tmp_path / "does-not-exist")
    seen, sink = _collect()
    result = fit(tiny_config, runs_dir=tmp_path, on_event=sink)
    assert result.status == ev.FAILED
    assert "does-not-exist" in result.message
    assert isinstance(seen[-1], ev.RunFinished) and seen[-1].status == ev.FAILED
    assert not (result.run_dir / "error.log").exists()   # a user error, not a bug


@pytest.mark.parametrize("scheduler", ["step", "multistep", "exponential", "cosine", "onecycle", "plateau"])
def test_every_scheduler_runs_and_changes_the_learning_rate(tmp_path, tiny_config, monkeypatch, scheduler):
    tiny_config.optim.scheduler = scheduler
    tiny_config.optim.step_size = 1
    tiny_config.optim.milestones = [1]
    tiny_config.optim.gamma = 0.5
    tiny_config.epochs = 3
    if scheduler == "plateau":
        # ReduceLROnPlateau (patience 2) decays once 3 epochs in a row have not improved on the
        # best: the first epoch sets it, epochs 2-4 do not beat it, epoch 5 trains at half the rate.
        tiny_config.epochs = 5
        _script_val_accuracy(monkeypatch, [0.5] * 5)
    result = fit(tiny_config, runs_dir=tmp_path)
    assert result.status == ev.FINISHED, result.message
    lrs = [row["lr"] for row in result.history]
    lr = tiny_config.optim.lr
    if scheduler != "onecycle":   # rows hold the rate each epoch trained at: epoch 1 at the set rate
        assert lrs[0] == pytest.approx(lr), lrs
    assert lrs[-1] < lr, lrs
    if scheduler == "plateau":
        assert lrs == pytest.approx([lr] * 4 + [lr * 0.5]), lrs


def test_warmup_ramps_the_learning_rate(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setattr("core.trainer.REPORT_EVERY_S", 0.0)   # report every batch, not 4 per second
    tiny_config.optim.warmup_epochs = 1
    seen, sink = _collect()
    fit(tiny_config, runs_dir=tmp_path, on_event=sink)
    first_epoch = [e.lr for e in seen if isinstance(e, ev.BatchEnded) and e.epoch == 1]
    later = [e.lr for e in seen if isinstance(e, ev.BatchEnded) and e.epoch == 2]
    assert first_epoch[0] == pytest.approx(tiny_config.optim.lr / len(first_epoch))   # step 1 of the ramp
    assert first_epoch == sorted(first_epoch) and first_epoch[-1] == pytest.approx(tiny_config.optim.lr)
    assert later and all(lr == pytest.approx(tiny_config.optim.lr) for lr in later)


@pytest.mark.parametrize("optimizer", choices.OPTIMIZERS.names())   # every optimiser the lab offers trains
def test_optimizers_accumulation_clipping_smoothing_and_class_weights(tmp_path, tiny_config, optimizer):
    tiny_config.optim.optimizer = optimizer
    tiny_config.optim.lr = 0.001
    tiny_config.optim.accumulation_steps = 2
    tiny_config.optim.grad_clip = 1.0
    tiny_config.optim.label_smoothing = 0.1
    tiny_config.optim.class_weights = "balanced"
    tiny_config.epochs = 1
    result = fit(tiny_config, runs_dir=tmp_path)
    assert result.status == ev.FINISHED, result.message
    assert 0.0 < result.history[0]["train_loss"] < 10


def test_an_unknown_optimizer_is_a_config_error_naming_the_valid_ones(tiny_config):
    """It used to become RMSprop without a word."""
    tiny_config.optim.optimizer = "lamb"   # set after validation, as a caller may
    model = models.create_model("tutorial_net", num_classes=3).model
    with pytest.raises(ConfigError, match="Unknown optimizer 'lamb'. Choose one of: sgd, adam, adamw, rmsprop, adagrad"):
        trainer.build_optimizer(model, tiny_config)


@pytest.fixture
def imbalanced_config(tiny_config, tiny_folder, tmp_path):
    """tiny_config on a copy of the tiny set with 40 / 15 / 5 training images per class."""
    root = tmp_path / "imbalanced"
    for cls, keep in zip(("airplane", "cat", "ship"), (40, 15, 5)):
        for split, n in (("train", keep), ("test", 10)):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((tiny_folder / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(f, root / split / cls / f.name)
    tiny_config.data.location = str(root)
    tiny_config.epochs = 1
    return tiny_config


def _first_batch_loss(config, runs_dir, monkeypatch):
    """The loss of the first training batch (same seed: same initial weights and same batch)."""
    monkeypatch.setattr("core.trainer.REPORT_EVERY_S", 0.0)
    seen, sink = _collect()
    result = fit(config, runs_dir=runs_dir, on_event=sink, should_stop=lambda: bool(_of(ev.BatchEnded, seen)))
    assert result.status == ev.STOPPED, result.message
    return _of(ev.BatchEnded, seen)[0].loss


def test_label_smoothing_and_class_weights_change_the_loss(tmp_path, imbalanced_config, monkeypatch):
    cfg = imbalanced_config
    plain = _first_batch_loss(cfg, tmp_path / "plain", monkeypatch)
    cfg.optim.label_smoothing = 0.2
    smoothed = _first_batch_loss(cfg, tmp_path / "smoothed", monkeypatch)
    cfg.optim.label_smoothing = 0.0
    cfg.optim.class_weights = "balanced"
    weighted = _first_batch_loss(cfg, tmp_path / "weighted", monkeypatch)
    assert smoothed != plain and weighted != plain, (plain, smoothed, weighted)
    # "balanced" is inverse class frequency, scaled so that a balanced set gives all ones
    w = trainer.class_weights_for(cfg, [0] * 40 + [1] * 15 + [2] * 5, 3)
    assert w.tolist() == pytest.approx([60 / (3 * 40), 60 / (3 * 15), 60 / (3 * 5)])


def test_gradient_clipping_bounds_each_update(tmp_path, tiny_config):
    """Plain SGD (no momentum, no weight decay) moves the weights by lr × the clipped gradient per
    step, so with max norm c the whole epoch moves them by at most steps × lr × c."""
    tiny_config.optim.momentum = 0.0
    tiny_config.optim.weight_decay = 0.0
    tiny_config.epochs = 1
    trainer.seed_everything(tiny_config.seed)          # what fit does before building the model
    start = {k: v.clone() for k, v in trainer.prepare(tiny_config).model.named_parameters()}

    def moved(result):
        end = _weights(result.run_dir / "last.pth")
        return torch.sqrt(sum(((end[k] - v) ** 2).sum() for k, v in start.items())).item()

    seen, sink = _collect()
    free = fit(tiny_config, runs_dir=tmp_path / "free", on_event=sink)
    steps = _of(ev.RunStarted, seen)[0].batches_per_epoch
    tiny_config.optim.grad_clip = 1e-3
    clipped = fit(tiny_config, runs_dir=tmp_path / "clipped")
    assert free.status == clipped.status == ev.FINISHED
    bound = steps * tiny_config.optim.lr * 1e-3
    assert moved(clipped) <= bound * (1 + 1e-4)
    assert moved(free) > 10 * bound


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path, tiny_config):
    """Two accumulated batches of 8 are one batch of 16: same order (one permutation), no
    augmentation and no BatchNorm in the tutorial net, so the weights agree to rounding."""
    tiny_config.data.val_fraction = 0.16          # 96 training images: 6 batches of 16, 12 of 8
    tiny_config.data.train_augment = []
    tiny_config.epochs = 1
    big = fit(tiny_config, runs_dir=tmp_path / "big")
    tiny_config.data.batch_size = 8
    tiny_config.optim.accumulation_steps = 2
    accumulated = fit(tiny_config, runs_dir=tmp_path / "accumulated")
    assert big.status == accumulated.status == ev.FINISHED
    a, b = _weights(big.run_dir / "last.pth"), _weights(accumulated.run_dir / "last.pth")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), (key, (a[key] - b[key]).abs().max())


def test_early_stopping_ends_the_run_before_the_last_epoch(tmp_path, tiny_config):
    tiny_config.epochs = 6
    tiny_config.optim.lr = 1e-7   # nothing improves after the first epoch
    tiny_config.early_stopping_patience = 1
    tiny_config.monitor = "val_loss"
    tiny_config.data.val_fraction = 0.2
    result = fit(tiny_config, runs_dir=tmp_path)
    assert result.status == ev.FINISHED
    assert result.epochs_completed < 6


def test_same_seed_same_losses_on_cpu(tmp_path, tiny_config):
    tiny_config.epochs = 1
    a = fit(tiny_config, runs_dir=tmp_path / "a")
    b = fit(tiny_config, runs_dir=tmp_path / "b")
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    tiny_config.seed = 2
    c = fit(tiny_config, runs_dir=tmp_path / "c")
    assert c.history[0]["train_loss"] != a.history[0]["train_loss"]


def test_run_folder_and_checkpoint_load_with_plain_torch_and_torchvision(tmp_path, tiny_config):
    tiny_config.model.name = "resnet18"
    tiny_config.model.small_input_stem = False
    tiny_config.data.image_size = 32
    tiny_config.epochs = 1
    result = fit(tiny_config, runs_dir=tmp_path)
    assert result.status == ev.FINISHED, result.message
    for name in ("config.json", "events.jsonl", "eval.json", "status.json", "last.pth", "best.pth"):
        assert (result.run_dir / name).exists(), name
    ckpt = torch.load(result.run_dir / "best.pth", weights_only=True)      # no lab code involved
    model = torchvision.models.get_model(ckpt["model_name"], num_classes=len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    assert ckpt["classes"] == ["airplane", "cat", "ship"]
    assert ckpt["transform"]["mode"] == "RGB"
    assert RunConfig.from_dict(ckpt["config"]) == tiny_config
    status = json.loads((result.run_dir / "status.json").read_text())
    assert status["status"] == ev.FINISHED


@pytest.mark.parametrize("in_memory", ["on", "off"])
def test_grayscale_images_train_with_one_channel_on_both_data_paths(tmp_path, tiny_folder, tiny_config, in_memory):
    from PIL import Image
    gray = tmp_path / "gray"
    for f in tiny_folder.rglob("*.jpg"):
        out = gray / f.relative_to(tiny_folder)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("L").save(out.with_suffix(".png"))
    tiny_config.data.location = str(gray)
    tiny_config.data.in_memory = in_memory
    tiny_config.data.normalize = "imagenet"     # 3-channel statistics must be reduced to one
    tiny_config.epochs = 1
    seen, sink = _collect()
    result = fit(tiny_config, runs_dir=tmp_path / "runs", on_event=sink)
    assert result.status == ev.FINISHED, result.message
    started = next(e for e in seen if isinstance(e, ev.RunStarted))
    assert started.input_shape == [1, 32, 32]
    assert any(("in-memory" in n) == (in_memory == "on") for n in started.notes if n.startswith("data:"))
    ckpt = load_checkpoint(result.run_dir / "last.pth")
    assert len(ckpt["transform"]["normalization"]["mean"]) == 1


def test_out_of_memory_hint_uses_the_memory_calculator(tiny_config):
    """On a GPU an OOM stops the run with the batch the calculator says fits; checked here on the
    calculator side: the batch it names fits the budget and one more does not."""
    from core import memory
    budget = 64 * 1024**2
    bs = resources.largest_fitting_batch(tiny_config, 3, (3, 32, 32), budget)
    factory = memory.ZooFactory("tutorial_net", 3, 3, (32, 32), True, "none", 0)
    assert bs > 0
    assert memory.estimate_memory(factory, (3, 32, 32), bs).required_bytes <= budget
    assert memory.estimate_memory(factory, (3, 32, 32), bs + 1).required_bytes > budget


def _raise_out_of_memory(self, *args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_in_a_training_step_fails_the_run_with_advice(tmp_path, tiny_config, monkeypatch):
    """Here on the CPU there is no GPU memory to size a batch for: the message says which batch
    size failed and to lower it, without a calculator figure."""
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", _raise_out_of_memory)   # the step's loss
    seen, sink = _collect()
    result = fit(tiny_config, runs_dir=tmp_path, on_event=sink)
    assert result.status == ev.FAILED
    assert "batch size 16" in result.message and "Lower the batch size" in result.message, result.message
    assert "calculator" not in result.message
    assert _of(ev.RunFinished, seen)[-1].message == result.message
    assert not (result.run_dir / "error.log").exists()   # a known condition, not an internal error


def test_out_of_memory_on_a_gpu_names_the_batch_the_calculator_says_fits(tiny_config, monkeypatch):
    gpu_bytes = 256 * 1024**2
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=gpu_bytes))
    msg = trainer._oom_message(tiny_config, (3, 32, 32), 3, torch.device("cuda", 0))
    fits = resources.largest_fitting_batch(tiny_config, 3, (3, 32, 32), 0.9 * gpu_bytes)
    assert fits > 16
    assert "batch size 16" in msg and f"says batch size {fits} fits" in msg, msg


@pytest.mark.parametrize("error, logged_with_trace", [(ModelError("cannot size this model"), False),
                                                      (TypeError("a bug in the calculator"), True)])
def test_a_failing_out_of_memory_hint_is_logged_and_the_advice_stays(tiny_config, monkeypatch, caplog, error,
                                                                     logged_with_trace):
    """The calculator's batch is best effort: an expected refusal is logged in a line, anything
    else (a bug) with its traceback; the message keeps the advice either way."""
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=2**30))

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(resources, "largest_fitting_batch", fail)
    with caplog.at_level(logging.INFO, logger="core.trainer"):
        msg = trainer._oom_message(tiny_config, (3, 32, 32), 3, torch.device("cuda", 0))
    assert msg.startswith("Out of GPU memory at batch size 16.") and "Lower the batch size" in msg, msg
    records = [r for r in caplog.records if "batch suggestion" in r.getMessage()]
    assert len(records) == 1 and str(error) in records[0].getMessage() + str(records[0].exc_info)
    assert (records[0].exc_info is not None) == logged_with_trace


def test_a_failing_tensorboard_log_is_logged_with_its_trace_and_the_run_goes_on(tmp_path, tiny_config, monkeypatch,
                                                                              caplog):
    calls = []

    def broken_sink(config, data_dir):
        def sink(event):
            calls.append(event)
            raise ZeroDivisionError("a bug in the TensorBoard sink")
        return sink

    monkeypatch.setattr(trainer, "_tensorboard_sink", broken_sink)
    tiny_config.tensorboard = True
    tiny_config.epochs = 1
    with caplog.at_level(logging.WARNING, logger="core.rundir"):   # the run's event log feeds TensorBoard
        result = fit(tiny_config, runs_dir=tmp_path)
    assert result.status == ev.FINISHED, result.message
    records = [r for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info[0] is ZeroDivisionError
    assert len(calls) == 1   # the run went on without it, not failing on every event


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_out_of_memory_on_the_gpu_fails_the_run_with_the_calculators_batch(tmp_path, tiny_config, monkeypatch):
    tiny_config.device = "cuda"
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", _raise_out_of_memory)
    result = fit(tiny_config, runs_dir=tmp_path)
    total = torch.cuda.get_device_properties(0).total_memory
    fits = resources.largest_fitting_batch(tiny_config, 3, (3, 32, 32), 0.9 * total)
    assert result.status == ev.FAILED and f"says batch size {fits} fits" in result.message, result.message


def test_batch_and_epoch_events_carry_loss_rate_speed_and_eta(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setattr("core.trainer.REPORT_EVERY_S", 0.0)
    seen, sink = _collect()
    result = fit(tiny_config, runs_dir=tmp_path, on_event=sink)
    assert result.status == ev.FINISHED, result.message
    batches = _of(ev.BatchEnded, seen)
    per_epoch = _of(ev.RunStarted, seen)[0].batches_per_epoch
    assert len(batches) == 2 * per_epoch
    for e in batches:   # per-epoch cosine: every batch trains at its epoch's rate (0.01, then 0.005)
        assert 0 < e.loss < 10 and e.images_per_sec > 0, e
        assert e.lr == pytest.approx(result.history[e.epoch - 1]["lr"]) and e.lr > 0, e
    epochs = _of(ev.EpochEnded, seen)
    assert [e.epoch for e in epochs] == [1, 2]
    assert epochs[0].eta_seconds > 0 and epochs[-1].eta_seconds == 0
    assert all(e.seconds > 0 and e.images_per_sec > 0 for e in epochs)


def test_best_checkpoint_holds_the_best_epochs_weights(tmp_path, tiny_config, monkeypatch):
    tiny_config.epochs = 4
    _script_val_accuracy(monkeypatch, [0.5, 0.9, 0.6, 0.7])       # best: epoch 2
    snapshots = {}

    def keep_weights(event):   # last.pth is written before EpochEnded: the weights after that epoch
        if isinstance(event, ev.EpochEnded):
            snapshots[event.epoch] = _weights(tmp_path / "best-test" / "last.pth")

    result = fit(tiny_config, runs_dir=tmp_path, run_id="best-test", on_event=keep_weights)
    assert result.status == ev.FINISHED, result.message
    best_row = max(result.history, key=lambda row: row["val_accuracy"])
    assert best_row["epoch"] == result.best_epoch == 2 and result.best_metric == 0.9
    best = load_checkpoint(result.run_dir / "best.pth")
    assert best["epoch"] == 2
    _assert_same_weights(best["model"], snapshots[2])
    assert not torch.equal(best["model"]["conv1.weight"], snapshots[4]["conv1.weight"])


def test_resolve_device_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert trainer.resolve_device("auto") == torch.device("cpu")
    assert trainer.resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError) as err:
            trainer.resolve_device(name)
        assert repr(name) in str(err.value) and "no CUDA GPU" in str(err.value)
    with pytest.raises(ConfigError, match="'mps'"):
        trainer.resolve_device("mps")


def test_deterministic_switches_are_put_back_when_the_run_ends(tmp_path, tiny_config):
    tiny_config.deterministic = True
    tiny_config.epochs = 1

    def switches():
        return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))

    saved_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True           # a value the run changes, to see it come back
    try:
        before = switches()
        assert before[:2] == (False, False)
        during = []
        result = fit(tiny_config, runs_dir=tmp_path,
                     on_event=lambda e: during.append(switches()) if isinstance(e, ev.RunStarted) else None)
        assert result.status == ev.FINISHED, result.message
        assert during[0][:3] == (True, True, False)   # the run itself was deterministic
        assert switches() == before
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark


def test_every_run_folder_gets_its_card_from_a_plain_fit_call(tmp_path, tiny_config):
    """card.json is written by the trainer, not only by the run history's listener: at RunStarted
    (what, on what, where) and completed at RunFinished (status, duration), one session per start."""
    at_start = {}

    def sink(event):
        if isinstance(event, ev.RunStarted):   # written before the caller hears of the start
            at_start.update(json.loads((tmp_path / event.run_id / "card.json").read_text(encoding="utf-8")))

    result = fit(tiny_config, runs_dir=tmp_path, on_event=sink)
    assert result.status == ev.FINISHED, result.message
    assert at_start["status"] == ev.RUNNING and at_start["sessions"] == 1 and "duration_s" not in at_start
    card = json.loads((result.run_dir / "card.json").read_text(encoding="utf-8"))
    assert card["run_id"] == result.run_id and card["model"]["name"] == "tutorial_net"
    assert card["model"]["params"] > 60_000 and card["model"]["input_shape"] == [3, 32, 32]
    assert card["dataset"]["source"] == "folder" and card["dataset"]["split_sizes"] == {"train": 105, "val": 15,
                                                                                        "test": 30}
    assert card["seed"] == 1 and card["device"] == "cpu" and card["status"] == ev.FINISHED
    assert card["sessions"] == 1 and len(card["session_seconds"]) == 1 and card["duration_s"] > 0
    assert {"python", "torch", "torchvision", "numpy"} <= set(card["versions"])
    # A run that fails before it starts training still leaves a card saying so.
    tiny_config.data.location = str(tmp_path / "does-not-exist")
    failed = fit(tiny_config, runs_dir=tmp_path)
    card = json.loads((failed.run_dir / "card.json").read_text(encoding="utf-8"))
    assert failed.status == ev.FAILED and card["status"] == ev.FAILED and "does-not-exist" in card["message"]


def test_an_internal_error_names_no_server_path_and_keeps_the_trace(tmp_path, tiny_config, monkeypatch):
    """Other users may view a failed run: its message shows the error without server paths; the
    trace, paths and all, stays in the run's error.log."""
    from core import trainer

    def broken(*args, **kwargs):
        raise OSError(f"[Errno 5] Input/output error: '{tmp_path}/secret/cache.bin'")

    monkeypatch.setattr(trainer, "train_one_epoch", broken)
    result = fit(tiny_config, runs_dir=tmp_path)
    assert result.status == ev.FAILED
    assert result.message.startswith("internal error: OSError: [Errno 5] Input/output error: 'cache.bin'")
    assert str(tmp_path) not in result.message and "error.log" in result.message
    assert f"{tmp_path}/secret/cache.bin" in (result.run_dir / "error.log").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Defects of issue 13, each first seen failing
# ---------------------------------------------------------------------------------------------
def test_mixed_sizes_past_the_first_200_training_images_take_the_resizing_path(tmp_path, tiny_config):
    """The native size used to be judged from the first 200 training images, all of class 'a'
    here, so the 36×36 images of class 'b' reached the in-memory path, which takes one size only."""
    rng = np.random.default_rng(0)
    for cls, n, size in (("a", 260, 32), ("b", 30, 36)):
        folder = tmp_path / "mixed" / cls
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    tiny_config.data.location = str(tmp_path / "mixed")
    tiny_config.epochs = 1
    seen, sink = _collect()
    result = fit(tiny_config, runs_dir=tmp_path / "runs", on_event=sink)
    assert result.status == ev.FINISHED, result.message
    started = _of(ev.RunStarted, seen)[0]
    assert any(note.startswith("data: DataLoader") for note in started.notes)
    assert trainer.planned_input(tiny_config) == (2, started.input_shape)   # what the memory check sizes


def test_a_resumed_run_stops_early_where_an_uninterrupted_one_does(tmp_path, tiny_config, monkeypatch):
    """The epochs without improvement before a stop count after the resume too."""
    tiny_config.epochs = 6
    tiny_config.early_stopping_patience = 2
    accuracies = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05]   # only epoch 1 is ever the best
    _script_val_accuracy(monkeypatch, accuracies)
    one_go = fit(tiny_config, runs_dir=tmp_path / "a")
    assert (one_go.status, one_go.epochs_completed) == (ev.FINISHED, 3)

    monkeypatch.undo()
    _script_val_accuracy(monkeypatch, accuracies)
    epochs_seen = []
    stopped = fit(tiny_config, runs_dir=tmp_path / "b",
                  on_event=lambda e: epochs_seen.append(e) if isinstance(e, ev.EpochEnded) else None,
                  should_stop=lambda: len(epochs_seen) >= 2)
    assert (stopped.status, stopped.epochs_completed) == (ev.STOPPED, 2)
    monkeypatch.undo()
    _script_val_accuracy(monkeypatch, accuracies[2:])
    resumed = fit(tiny_config, resume_from=stopped.run_dir / "last.pth")
    assert (resumed.status, resumed.epochs_completed) == (ev.FINISHED, 3), resumed.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="DataParallel without GPUs calls the model itself")
def test_inputs_stay_channels_last_under_data_parallel(tiny_config):
    prep = trainer.prepare(tiny_config)
    model = prep.model.to(memory_format=torch.channels_last)
    model._lab_channels_last = True
    formats = []
    model.register_forward_pre_hook(
        lambda module, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    wrapped = torch.nn.DataParallel(model)
    optimizer = trainer.build_optimizer(model, tiny_config)
    loss_fn = torch.nn.CrossEntropyLoss()
    trainer.train_one_epoch(wrapped, prep.train_loader, optimizer, loss_fn, prep.device, epoch=1, config=tiny_config)
    trainer.evaluate(wrapped, prep.val_loader, loss_fn, prep.device)
    assert formats and all(formats), formats


@pytest.mark.parametrize("damage", ["missing", "not a checkpoint"])
def test_a_resume_from_a_bad_checkpoint_ends_as_a_failed_run_instead_of_raising(tmp_path, tiny_config, damage):
    """fit's promise: errors never escape; the run ends failed with the reason."""
    run = tmp_path / "20250101-000000-tutorial_net-abcdef"
    run.mkdir()
    if damage != "missing":
        (run / "last.pth").write_bytes(b"not a checkpoint")
    seen, sink = _collect()
    result = fit(tiny_config, on_event=sink, resume_from=run / "last.pth")
    assert result.status == ev.FAILED and "last.pth" in result.message, result.message
    assert isinstance(seen[-1], ev.RunFinished) and seen[-1].status == ev.FAILED
    assert json.loads((run / "status.json").read_text())["status"] == ev.FAILED


def test_the_plateau_schedulers_patience_is_a_setting(tmp_path, tiny_config, monkeypatch):
    tiny_config.optim.scheduler = "plateau"
    tiny_config.optim.plateau_patience = 0   # decay after the first epoch that does not improve
    tiny_config.optim.gamma = 0.5
    tiny_config.epochs = 3
    _script_val_accuracy(monkeypatch, [0.5] * 3)
    result = fit(tiny_config, runs_dir=tmp_path)
    assert result.status == ev.FINISHED, result.message
    lr = tiny_config.optim.lr
    assert [row["lr"] for row in result.history] == pytest.approx([lr, lr, lr * 0.5])


@pytest.mark.slow   # torch.compile takes 20-30 s on 2 cores
def test_compile_trains_and_keeps_plain_checkpoints(tiny_config, tmp_path):
    """Issue 16: RunConfig.compile runs the model through torch.compile; the checkpoint holds the plain
    module's state (no "_orig_mod." prefixes), so everything that loads runs reads it as usual."""
    import torch

    tiny_config.compile = True
    tiny_config.epochs = 1
    result = fit(tiny_config, runs_dir=tmp_path)
    assert result.status == ev.FINISHED, result.message
    state = torch.load(result.run_dir / "last.pth", weights_only=False)["model"]
    assert "conv1.weight" in state and not any(k.startswith("_orig_mod") for k in state)
