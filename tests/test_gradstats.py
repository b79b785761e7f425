"""Weight and gradient distributions (core/gradstats.py, recorded by the trainer when asked):
what is recorded is the checkpoint's weights, nothing is done when off, and vanishing and
exploding gradients of real networks are told apart from healthy ones."""
import torch
from torch import nn

from core import gradstats, rundir, trainer
from core.checkpoints import load_checkpoint
from core.config import RunConfig
from core.trainer import fit


def _config(tiny_folder, record, **model):
    return RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
                                "model": {"name": "tutorial_net", **model}, "optim": {"lr": 0.02}, "epochs": 2,
                                "device": "cpu", "seed": 1, "record_distributions": record})


def test_recorded_weights_are_the_epochs_checkpoint_and_gradients_are_there(tiny_folder, tmp_path):
    result = fit(_config(tiny_folder, True), runs_dir=tmp_path)
    assert result.status == "finished", result.message
    frame = gradstats.read_distributions(result.run_dir)
    weights = load_checkpoint(result.run_dir / rundir.LAST_CKPT)["model"]
    assert sorted(frame["epoch"].unique()) == [1, 2]
    assert frame[frame["epoch"] == 2]["layer"].tolist() == list(weights)   # every tensor, in the model's order
    for _, row in frame[frame["epoch"] == 2].iterrows():
        w = weights[row["layer"]].flatten().float()
        q = torch.quantile(w, torch.tensor(gradstats.QUANTILES)).tolist()
        assert [row[c] for c in gradstats.QUANTILE_NAMES] == [float(v) for v in q], row["layer"]
        assert row["weight_norm"] == float(torch.linalg.vector_norm(w))
        assert 0 < row["grad_norm"] < 100
    assert gradstats.diagnose(frame)["status"] == "ok"


def test_recording_does_not_change_what_is_trained(tiny_folder, tmp_path):
    on = fit(_config(tiny_folder, True), runs_dir=tmp_path / "on")
    off = fit(_config(tiny_folder, False), runs_dir=tmp_path / "off")
    a, b = (load_checkpoint(r.run_dir / rundir.LAST_CKPT)["model"] for r in (on, off))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_layers_have_no_gradient_norm(tiny_folder, tmp_path):
    result = fit(_config(tiny_folder, True, freeze="features"), runs_dir=tmp_path)
    assert result.status == "finished", result.message
    frame = gradstats.read_distributions(result.run_dir)
    frozen = frame["layer"].str.startswith(("conv1", "conv2", "fc1", "fc2"))
    assert frame[frozen]["grad_norm"].isna().all() and frame[~frozen]["grad_norm"].gt(0).all()


def test_recording_off_builds_nothing_and_leaves_the_loop_alone(tiny_folder, tmp_path, monkeypatch):
    class Forbidden:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a recorder was built with recording off")

    seen = []
    real = trainer.train_one_epoch

    def spy(*args, **kwargs):
        seen.append(kwargs.get("before_last_step"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gradstats, "DistributionRecorder", Forbidden)
    monkeypatch.setattr(trainer, "train_one_epoch", spy)
    result = fit(_config(tiny_folder, False), runs_dir=tmp_path)
    assert result.status == "finished", result.message
    assert seen == [None, None]                                # no per-step callback in either epoch
    assert not (result.run_dir / rundir.DISTRIBUTIONS_FILE).exists()
    assert gradstats.diagnose(gradstats.read_distributions(result.run_dir))["status"] == "no data"


def _one_step_frame(model, x, y):
    nn.functional.cross_entropy(model(x), y).backward()
    recorder = gradstats.DistributionRecorder(model)
    recorder.grads()
    return gradstats.frame_from_records([recorder.record(1)])


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)


def test_a_deep_sigmoid_network_has_vanishing_gradients_and_a_relu_one_does_not():
    torch.manual_seed(0)
    deep = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 4))
    verdict = gradstats.diagnose(_one_step_frame(deep, *_data()))
    assert verdict["status"] == "vanishing", verdict
    assert "0.weight" in verdict["messages"][0] and "early layers barely learn" in verdict["messages"][0]
    torch.manual_seed(0)
    shallow = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    assert gradstats.diagnose(_one_step_frame(shallow, *_data()))["status"] == "ok"


def test_a_network_with_oversized_weights_has_exploding_gradients():
    torch.manual_seed(0)
    layers = [nn.Linear(16, 16) for _ in range(12)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.mul_(8.0)     # each layer multiplies the signal several times over
    net = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())], nn.Linear(16, 4))
    verdict = gradstats.diagnose(_one_step_frame(net, *_data()))
    assert verdict["status"] == "exploding", verdict
    assert "the size of its weights" in verdict["messages"][0]


def test_a_resumed_epoch_keeps_its_last_record_and_a_nan_gradient_is_exploding():
    first = {"epoch": 1, "layers": {"w": {"weight_norm": 1.0, "grad_norm": 0.5}}}
    again = {"epoch": 1, "layers": {"w": {"weight_norm": 2.0, "grad_norm": float("nan")}}}
    frame = gradstats.frame_from_records([first, again])
    assert frame["weight_norm"].tolist() == [2.0]
    verdict = gradstats.diagnose(frame)
    assert verdict["status"] == "exploding" and "w is nan in epoch 1" in verdict["messages"][0]
    inf = gradstats.frame_from_records([{"epoch": 3, "layers": {"fc.weight": {"weight_norm": 1.0,
                                                                              "grad_norm": float("inf")}}}])
    verdict = gradstats.diagnose(inf)
    assert verdict["status"] == "exploding" and "fc.weight is inf in epoch 3" in verdict["messages"][0]
