"""The learning-rate range test (core/lrfinder.py): its suggestion against a sweep of fixed rates
on a toy problem, and a model and optimiser left exactly as they were."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core import lrfinder
from core.config import RunConfig
from core.errors import ConfigError
from tests.test_explain import one_thread




def blobs(n=2048):
    """Four overlapping Gaussian classes in 20 dimensions (not separable: the loss stays above 0)."""
    centres = torch.randn(4, 20, generator=torch.Generator().manual_seed(123)) * 1.5
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=g)
    return centres[y] + torch.randn(n, 20, generator=g) * 3.0, y


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


def loss_after_training(x, y, lr, steps=150):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = lrfinder._batches(loader(x, y))
    for _ in range(steps):
        xb, yb = next(batches)
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(x), y).item()
    return final if np.isfinite(final) else np.inf


def test_the_suggestion_is_within_10x_of_the_best_fixed_rate_of_a_sweep():
    """Measured: the sweep's best rate is 0.01 (final loss 0.35), the range test suggests 0.045."""
    with one_thread():
        x, y = blobs()
        rates = [10.0 ** e for e in np.arange(-4, 1.01, 0.5)]
        losses = [loss_after_training(x, y, r) for r in rates]
        best = rates[int(np.argmin(losses))]
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        result = lrfinder.lr_range_test(model, loader(x, y), opt, steps=100)
    assert result.suggestion is not None and result.stopped_early   # it ran into divergence and stopped
    assert best / 10 <= result.suggestion <= best * 10, (best, result.suggestion)
    curve = result.curve
    assert curve["lr"].is_monotonic_increasing and curve["lr"].iloc[0] == pytest.approx(1e-7)
    assert len(curve) < 100 and curve["smoothed"].min() < 0.9 * curve["smoothed"].iloc[0]   # it fell, then rose
    assert result.min_over_10 == pytest.approx(curve["lr"].iloc[int(curve["smoothed"].argmin())] / 10)
    assert "rule of thumb" in result.caveat
    # the lower of the two rules: steepest descent of the smoothed loss, and its minimum's rate ÷ 10
    steepest, min_over_10 = lrfinder._suggest(curve["lr"].to_numpy(), curve["smoothed"].to_numpy())
    assert result.suggestion == min(steepest, min_over_10)
    assert result.method.startswith("steepest descent" if steepest <= min_over_10 else "rate at the lowest")


def test_weights_optimizer_state_and_rng_are_restored():
    with one_thread():
        x, y = blobs(256)
        model = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
        opt.step()                                  # some Adam state to keep
        model.eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt_before = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
        torch.manual_seed(7)
        rng_before = torch.get_rng_state()
        result = lrfinder.lr_range_test(model, loader(x, y), opt, steps=30, end_lr=1.0)
    assert len(result.curve) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = opt.state_dict()
    assert after["param_groups"][0]["lr"] == 1e-3
    assert all(torch.equal(opt_before[k][n], t) for k, s in after["state"].items() for n, t in s.items())
    assert torch.equal(torch.get_rng_state(), rng_before) and not model.training


def test_find_lr_runs_on_a_run_configuration(tiny_folder):
    cfg = RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
                               "model": {"name": "tutorial_net"}, "device": "cpu", "seed": 0})
    with one_thread():
        result = lrfinder.find_lr(cfg, steps=40)
    assert 10 <= len(result.curve) <= 40 and result.curve["loss"].gt(0).all()
    assert set(result.to_dict()) == {"curve", "suggestion", "min_over_10", "method", "stopped_early", "caveat", "timed_out"}


def test_bad_ranges_are_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="0 < start rate < end rate"):
        lrfinder.lr_range_test(model, [], opt, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ConfigError, match="at least 10 steps"):
        lrfinder.lr_range_test(model, [], opt, steps=3)
    with pytest.raises(ConfigError, match=f"at most {lrfinder.MAX_STEPS} steps"):
        lrfinder.lr_range_test(model, [], opt, steps=lrfinder.MAX_STEPS + 1)


def test_each_step_is_reported_and_a_diverged_run_stops_reporting():
    with one_thread():
        x, y = blobs(256)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        seen = []
        result = lrfinder.lr_range_test(model, loader(x, y), opt, steps=60, on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 60) for i in range(1, len(result.curve) + 1)]


def test_a_low_average_in_the_warm_up_does_not_hide_a_later_descent():
    """A model that learns late: the loss is flat (the first average, of one lucky batch, the lowest
    of all) until the rate reaches ~0.1, then falls, then diverges. The suggestion lies in the fall."""
    from core.lrfinder import _suggest
    lrs = np.geomspace(1e-5, 10, 100)
    loss = np.full(100, 2.30)
    loss[0] = 1.90                                        # the warm-up's lucky first batch
    fall = (lrs > 0.03) & (lrs < 0.5)
    loss[fall] = 2.30 - 0.3 * np.log(lrs[fall] / 0.03) / np.log(0.5 / 0.03)
    loss[lrs >= 0.5] = 2.0 + 2 * np.log(lrs[lrs >= 0.5] / 0.5)
    suggestion, min_over_10 = _suggest(lrs, loss)
    assert suggestion is not None and 0.03 < suggestion < 0.5
    assert min_over_10 == pytest.approx(lrs[np.argmin(loss[10:]) + 10] / 10)


def test_a_flat_curve_gets_no_suggestion():
    """A loss that moves by 1 % (noise) says nothing about the rate: no suggestion, no minimum ÷ 10."""
    from core.lrfinder import _suggest
    rng = np.random.default_rng(0)
    lrs = np.geomspace(1e-5, 10, 100)
    flat = 2.30 + rng.normal(0, 0.005, 100)
    assert _suggest(lrs, flat) == (None, None)
    falling = flat.copy()
    falling[40:70] -= np.linspace(0, 0.4, 30)          # a clear fall (17 %), then back up
    falling[70:] -= np.linspace(0.4, -1.0, 30)
    suggestion, _ = _suggest(lrs, falling)
    assert suggestion is not None and lrs[40] <= suggestion <= lrs[70]


def test_the_test_stops_at_its_time_limit_and_says_so():
    """The server's finder must end whatever the model: after max_seconds it stops where it is."""
    with one_thread():
        x, y = blobs(256)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        result = lrfinder.lr_range_test(model, loader(x, y), opt, steps=100, max_seconds=0.0)
    assert result.timed_out and not result.stopped_early and len(result.curve) == 1
    assert result.to_dict()["timed_out"] is True
