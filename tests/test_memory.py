"""core.memory: the estimate against what a real CPU training step holds.

Ground truth is ``measure_training_step_memory``: the bytes autograd saves in a real forward
(same hook, real tensors) and the torch.profiler allocator peak of a real step. Sizes are kept
small so the whole file runs in about a minute on two cores.
"""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

from core.errors import ConfigError, LabError, ModelError
from core.memory import (
    MEMORY_BUDGETS_GB,
    OPTIMIZERS,
    MaxBatch,
    MemoryEstimate,
    ZooFactory,
    clear_cache,
    estimate_memory,
    max_batch_size,
    measure_training_step_memory,
    optimizer_state_multiplier,
)

MiB = 1 << 20

from core import models as zoo


def factory(name: str, num_classes: int = 10, input_size: int = 32, freeze: str = "none") -> ZooFactory:
    """A zero-argument model factory for a zoo entry (also the estimate cache key)."""
    return ZooFactory(name, num_classes, input_size=input_size, freeze=freeze)


def real_model(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return factory(name, **kw)()


# ---------------------------------------------------------------------------------------------
# Saved activations: exact against a real forward on the CPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,batch,freeze", [
    ("resnet18", 32, 2, "none"),
    ("resnet18", 224, 1, "none"),
    ("vgg11", 32, 2, "none"),
    ("vgg11", 224, 1, "none"),
    ("tutorial_net", 32, 4, "none"),
    ("resnet18", 32, 4, "features"),
])
def test_saved_activations_match_a_real_training_step(name, size, batch, freeze):
    est = estimate_memory(factory(name, input_size=size, freeze=freeze), (3, size, size), batch,
                          simulate_step=False, inference=False)
    real = measure_training_step_memory(real_model(name, input_size=size, freeze=freeze), (3, size, size),
                                        batch, measure_peak=False)
    assert real["saved_activation_bytes"] > 0
    assert est.activation_bytes == pytest.approx(real["saved_activation_bytes"], rel=0.02)
    # in fact it is exact, layer by layer
    assert est.activation_bytes == real["saved_activation_bytes"]
    pd.testing.assert_series_equal(est.layers["saved_bytes"], real["layers"]["saved_bytes"])
    assert est.gradient_bytes == real["gradient_bytes"]
    assert est.optimizer_bytes == real["optimizer_state_bytes"]
    assert est.param_bytes == real["param_bytes"]
    assert est.buffer_bytes == real["buffer_bytes"]
    assert est.output_bytes == real["output_bytes"]


def test_layer_table_attributes_every_saved_byte():
    est = estimate_memory(factory("resnet18"), (3, 32, 32), 8, simulate_step=False, inference=False)
    layers = est.layers
    assert list(layers.columns[:4]) == ["layer", "type", "saved_bytes", "output_shape"]
    assert layers["saved_bytes"].sum() == est.activation_bytes
    conv1 = layers.set_index("layer").loc["conv1"]
    assert conv1["type"] == "Conv2d" and tuple(conv1["output_shape"]) == (8, 64, 16, 16)
    bn1 = layers.set_index("layer").loc["bn1"]
    assert bn1["saved_bytes"] >= 8 * 64 * 16 * 16 * 4  # BatchNorm saves its input
    assert layers["layer"].iloc[-1] == "(loss)"  # log_softmax output saved by the loss
    assert layers.set_index("layer").loc["fc", "output_shape"] == (8, 10)


def test_activations_and_input_scale_linearly_with_batch():
    f = factory("resnet18")
    e2, e4, e6 = (estimate_memory(f, (3, 32, 32), b, simulate_step=False) for b in (2, 4, 6))
    for field in ("activation_bytes", "input_bytes", "output_bytes", "inference_activation_bytes"):
        a2, a4, a6 = getattr(e2, field), getattr(e4, field), getattr(e6, field)
        assert a6 - a4 == a4 - a2 > 0, field
    for field in ("param_bytes", "gradient_bytes", "optimizer_bytes"):
        assert getattr(e2, field) == getattr(e6, field)
    assert e2.input_bytes == 2 * 3 * 32 * 32 * 4 + 2 * 8


# ---------------------------------------------------------------------------------------------
# Parameters, gradients, optimiser state
# ---------------------------------------------------------------------------------------------

def test_parameter_bytes_of_known_models():
    vgg = estimate_memory(factory("vgg16", num_classes=1000), (3, 32, 32), 1, simulate_step=False, inference=False)
    assert vgg.num_params == 138_357_544
    assert vgg.param_bytes == 138_357_544 * 4
    assert round(vgg.param_bytes / MiB, 2) == 527.79
    res = estimate_memory(factory("resnet18", num_classes=1000), (3, 64, 64), 2, simulate_step=False, inference=False)
    assert res.num_params == 11_689_512
    assert res.param_bytes == res.gradient_bytes == 11_689_512 * 4


def test_frozen_backbone_leaves_only_the_head_gradients_and_state():
    full = estimate_memory(factory("resnet18"), (3, 32, 32), 8, optimizer="adam", simulate_step=False)
    frozen = estimate_memory(factory("resnet18", freeze="features"), (3, 32, 32), 8, optimizer="adam",
                             simulate_step=False)
    head_bytes = (512 * 10 + 10) * 4
    assert frozen.param_bytes == full.param_bytes  # weights are still all there
    assert frozen.trainable_params == 512 * 10 + 10
    assert frozen.gradient_bytes == head_bytes
    assert frozen.optimizer_bytes == 2 * head_bytes + 4 * 2  # exp_avg, exp_avg_sq + 2 step counters
    assert frozen.activation_bytes < full.activation_bytes  # nothing to save below the head
    assert frozen.training_total_bytes < full.training_total_bytes


def test_optimizer_multipliers_registry():
    assert optimizer_state_multiplier("sgd", momentum=0.9) == 1
    assert optimizer_state_multiplier("sgd", momentum=0.0) == 0
    assert optimizer_state_multiplier("adam") == optimizer_state_multiplier("adamw") == 2
    assert optimizer_state_multiplier("adam", amsgrad=True) == 3
    assert optimizer_state_multiplier("rmsprop", momentum=0.0) == 1
    assert optimizer_state_multiplier("rmsprop", momentum=0.0, centered=True) == 2
    assert optimizer_state_multiplier("rmsprop", momentum=0.9) == 2
    assert optimizer_state_multiplier("rmsprop", momentum=0.9, centered=True) == 3
    assert set(OPTIMIZERS.names()) >= {"sgd", "adam", "adamw", "rmsprop"}


@pytest.mark.parametrize("optimizer,momentum,options,mult", [
    ("sgd", 0.9, {}, 1),
    ("sgd", 0.0, {}, 0),
    ("adam", 0.9, {}, 2),
    ("adamw", 0.9, {"amsgrad": True}, 3),
    ("rmsprop", 0.0, {}, 1),
    ("rmsprop", 0.0, {"centered": True}, 2),
    ("rmsprop", 0.9, {}, 2),
    ("adagrad", 0.0, {}, 1),
])
def test_optimizer_state_matches_the_real_optimizer(optimizer, momentum, options, mult):
    f = factory("tutorial_net")
    est = estimate_memory(f, (3, 32, 32), 4, optimizer=optimizer, momentum=momentum,
                          optimizer_options=options, simulate_step=False, inference=False)
    real = measure_training_step_memory(real_model("tutorial_net"), (3, 32, 32), 4, optimizer=optimizer,
                                        momentum=momentum, optimizer_options=options, measure_peak=False)
    assert est.optimizer_multiplier == mult
    assert est.optimizer_bytes == real["optimizer_state_bytes"]
    n_tensors = len(list(f().parameters()))
    counters = 4 * n_tensors if optimizer != "sgd" else 0
    assert est.optimizer_bytes == mult * est.gradient_bytes + counters


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_halves_activations_and_keeps_fp32_master_weights(precision):
    f = factory("resnet18")
    fp32 = estimate_memory(f, (3, 32, 32), 8, simulate_step=False, inference=False)
    half = estimate_memory(f, (3, 32, 32), 8, precision=precision, simulate_step=False, inference=False)
    assert half.param_bytes == fp32.param_bytes  # master weights fp32
    assert half.gradient_bytes == fp32.gradient_bytes
    assert half.optimizer_bytes == fp32.optimizer_bytes
    assert 0.45 * fp32.activation_bytes < half.activation_bytes < 0.65 * fp32.activation_bytes
    # half-precision copies of the conv/linear weights (BatchNorm stays fp32): 2 bytes each
    cast = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for m in f().modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert half.weight_copy_bytes == 2 * cast
    assert fp32.weight_copy_bytes == 0
    assert half.output_bytes < fp32.output_bytes  # logits in half precision


def test_mixed_precision_matches_a_real_bf16_step():
    est = estimate_memory(factory("resnet18"), (3, 32, 32), 2, precision="bf16", simulate_step=False, inference=False)
    real = measure_training_step_memory(real_model("resnet18"), (3, 32, 32), 2, precision="bf16", measure_peak=False)
    assert est.activation_bytes == pytest.approx(real["saved_activation_bytes"], rel=0.02)
    assert est.activation_bytes == real["saved_activation_bytes"]
    assert est.weight_copy_bytes == real["weight_copy_bytes"]


# ---------------------------------------------------------------------------------------------
# Totals against the allocator peak of a real step
# ---------------------------------------------------------------------------------------------

def test_training_total_matches_the_profiler_peak_resnet18_batch32(capsys):
    f = factory("resnet18")
    est = estimate_memory(f, (3, 32, 32), 32, target_device="cpu")
    # oneDNN off: every allocation is a tensor the estimate can count
    plain = measure_training_step_memory(real_model("resnet18"), (3, 32, 32), 32, onednn=False)
    ratio_total = est.training_total_bytes / plain["peak_bytes"]
    ratio_sim = est.step_peak_bytes / plain["peak_bytes"]
    # oneDNN on (PyTorch's CPU default): its convolution-backward scratch space comes on top
    onednn = measure_training_step_memory(real_model("resnet18"), (3, 32, 32), 32)
    with capsys.disabled():
        print(f"\nResNet-18 32x32 batch 32 SGD: sum of components {est.training_total_bytes / MiB:.1f} MiB, "
              f"simulated step peak {est.step_peak_bytes / MiB:.1f} MiB; profiler peak "
              f"{plain['peak_bytes'] / MiB:.1f} MiB without oneDNN (ratios {ratio_total:.3f}, {ratio_sim:.3f}), "
              f"{onednn['peak_bytes'] / MiB:.1f} MiB with oneDNN on {onednn['threads']} threads "
              f"(ratio {est.required_bytes / onednn['peak_bytes']:.3f})")
    assert abs(ratio_total - 1) < 0.04
    assert abs(ratio_sim - 1) < 0.01
    assert onednn["peak_bytes"] >= plain["peak_bytes"] * 0.99
    assert est.activation_bytes == plain["saved_activation_bytes"] == onednn["saved_activation_bytes"]


@pytest.mark.parametrize("optimizer,options,target", [
    ("adam", {}, "cpu"),                                     # for-loop: a parameter-sized denominator
    ("sgd", {"weight_decay": 5e-4}, "cuda"),                 # foreach (CUDA default): grads + wd * params copy
    ("rmsprop", {"weight_decay": 1e-4, "centered": True}, "cuda"),
])
def test_simulated_step_peak_sees_optimizer_temporaries(optimizer, options, target):
    # For a model dominated by one big Linear the optimiser's temporaries decide the peak, above
    # the sum of components. target_device="cuda" simulates the foreach implementation, which the
    # CPU runs too when asked (foreach=True), so it is checked here against the profiler.
    def f():
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4096), nn.ReLU(), nn.Linear(4096, 10))
    est = estimate_memory(f, (3, 16, 16), 4, optimizer=optimizer, optimizer_options=options, target_device=target)
    real_options = dict(options, **({"foreach": True} if target == "cuda" else {}))
    real = measure_training_step_memory(f(), (3, 16, 16), 4, optimizer=optimizer, optimizer_options=real_options)
    assert est.step_peak_bytes > 1.2 * est.training_total_bytes
    assert est.required_bytes == est.step_peak_bytes
    assert est.step_peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01)
    assert max(est.step_phase_peaks, key=est.step_phase_peaks.get) == "optimizer step"


def test_inference_estimate():
    f = factory("tutorial_net")
    est = estimate_memory(f, (3, 32, 32), 16)
    assert est.inference_total_bytes < est.training_total_bytes
    assert est.inference_total_bytes == (est.param_bytes + est.buffer_bytes + 16 * 3 * 32 * 32 * 4
                                         + est.inference_activation_bytes)
    # the largest live pair in the tutorial Net: conv1's output and the ReLU's result
    assert est.inference_activation_bytes >= 2 * 16 * 6 * 28 * 28 * 4


# ---------------------------------------------------------------------------------------------
# Largest batch in a budget
# ---------------------------------------------------------------------------------------------

def test_max_batch_size_is_the_boundary_and_monotonic():
    f = factory("resnet18")
    answers = []
    for budget_mib in (150, 300, 1024, 4096):
        budget = budget_mib * MiB
        n = max_batch_size(f, (3, 32, 32), budget, total="training")
        assert isinstance(n, int) and isinstance(n, MaxBatch) and n >= 2
        at = estimate_memory(f, (3, 32, 32), n, simulate_step=False, inference=False)
        above = estimate_memory(f, (3, 32, 32), n + 1, simulate_step=False, inference=False)
        assert at.training_total_bytes <= budget < above.training_total_bytes
        assert n.estimate.batch_size == n and str(n) in n.reason
        answers.append(int(n))
    assert answers == sorted(answers) and len(set(answers)) == len(answers)


def test_max_batch_size_with_the_simulated_peak():
    f = factory("resnet18")
    budget = 256 * MiB
    n = max_batch_size(f, (3, 32, 32), budget)  # total="required": the simulated step peak
    assert n > 2
    at = estimate_memory(f, (3, 32, 32), n, inference=False)
    above = estimate_memory(f, (3, 32, 32), n + 1, inference=False)
    assert at.required_bytes == at.step_peak_bytes
    assert at.required_bytes <= budget < above.required_bytes
    assert n.estimate.step_peak_bytes == at.step_peak_bytes


def test_max_batch_size_zero_when_nothing_fits():
    n = max_batch_size(factory("vgg11"), (3, 32, 32), 64 * MiB)
    assert n == 0 and "batch 1" in n.reason and "budget" in n.reason
    assert n.estimate is not None and n.estimate.required_bytes > 64 * MiB
    # ResNet-18 at 32x32 cannot train on batch 1 at all (BatchNorm on a 1x1 map): said so
    r = max_batch_size(factory("resnet18"), (3, 32, 32), 100 * MiB, total="training")
    assert r == 0 and "value per channel" in r.reason


def test_budgets_for_the_ui():
    assert MEMORY_BUDGETS_GB == (4, 8, 16, 24, 80)


# ---------------------------------------------------------------------------------------------
# Result objects, caching, bad input
# ---------------------------------------------------------------------------------------------

def test_table_and_dict():
    est = estimate_memory(factory("tutorial_net"), (3, 32, 32), 4, device_overhead_bytes=MiB)
    assert isinstance(est, MemoryEstimate)
    table = est.as_table()
    assert list(table.columns) == ["component", "bytes", "MiB"]
    parts = table.iloc[:9]
    assert parts["bytes"].sum() == est.training_total_bytes
    assert est.overhead_bytes == MiB
    assert math.isclose(table.loc[table["component"].str.startswith("training total"), "MiB"].item(),
                        round(est.training_total_bytes / MiB, 2))
    d = est.to_dict()
    json.dumps(d)
    assert d["training_total_bytes"] == est.training_total_bytes and d["layers"][0]["layer"] == "conv1"
    assert "MiB" in est.summary()


def test_zoo_factory_results_are_cached():
    clear_cache()
    f = ZooFactory("resnet18", 10)
    a = estimate_memory(f, (3, 32, 32), 4, simulate_step=False)
    calls = []
    import core.memory as memory
    original = memory._Prepared.run
    memory._Prepared.run = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        b = estimate_memory(ZooFactory("resnet18", 10), (3, 32, 32), 4, simulate_step=False)
    finally:
        memory._Prepared.run = original
    assert not calls and a.to_dict() == b.to_dict()


@pytest.mark.parametrize("kwargs,words", [
    ({"batch_size": 0}, ["Batch size", "at least 1"]),
    ({"batch_size": -3}, ["Batch size"]),
    ({"batch_size": 2.5}, ["Batch size"]),
    ({"batch_size": True}, ["Batch size"]),
    ({"optimizer": "lamb"}, ["Unknown optimizer 'lamb'", "sgd", "adam", "adamw", "rmsprop"]),
    ({"precision": "fp8"}, ["Unknown precision 'fp8'", "fp32, fp16, bf16"]),
    ({"input_shape": (32, 32)}, ["Input shape", "(channels, height, width)"]),
    ({"input_shape": (3, 0, 32)}, ["Input shape"]),
    ({"momentum": -0.1}, ["Momentum"]),
    ({"device_overhead_bytes": -1}, ["device_overhead_bytes"]),
])
def test_bad_input_is_a_config_error(kwargs, words):
    args = {"model_factory": factory("tutorial_net"), "input_shape": (3, 32, 32), "batch_size": 4} | kwargs
    with pytest.raises(ConfigError) as err:
        estimate_memory(**args)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("budget", [0, -5, float("nan")])
def test_bad_budget(budget):
    with pytest.raises(ConfigError, match="budget"):
        max_batch_size(factory("tutorial_net"), (3, 32, 32), budget)


def test_bad_factory_and_impossible_input():
    with pytest.raises(ConfigError, match="zero-argument"):
        estimate_memory(zoo.TutorialNet(), (3, 32, 32), 2)   # a model, not a factory
    with pytest.raises(ConfigError, match="nn.Module"):
        estimate_memory(lambda: 42, (3, 32, 32), 2)

    def too_small():
        return nn.Sequential(nn.Conv2d(3, 8, 5), nn.Flatten(), nn.Linear(8 * 28 * 28, 10))
    with pytest.raises(ModelError, match="cannot train on input"):
        estimate_memory(too_small, (3, 16, 16), 2)
    with pytest.raises(ModelError, match="at least 2"):  # BatchNorm on a 1x1 map at batch 1
        estimate_memory(factory("resnet18"), (3, 32, 32), 1)
    with pytest.raises(LabError, match="budget"):
        max_batch_size(factory("tutorial_net"), (3, 32, 32), 0)
