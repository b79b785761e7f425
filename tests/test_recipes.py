"""Default recipes (issue 16): chosen from the data and the model, applied where the user set nothing."""
from __future__ import annotations

import json

import pytest

from core import recipes
from core.config import RunConfig


def test_from_scratch_on_full_cifar_is_the_measured_recipe():
    r = recipes.recommend("tutorial_net", pretrained=False, n_train=45_000, image_side=32, device_type="cpu")
    f = r.fields
    assert (f["data.batch_size"], f["epochs"], f["optim.optimizer"], f["optim.lr"]) == (128, 10, "sgd", 0.05)
    assert f["optim.scheduler"] == "onecycle" and f["optim.onecycle_warmup"] == 0.25
    assert f["optim.nesterov"] is True and f["optim.label_smoothing"] == 0.1 and f["optim.momentum"] == 0.9
    assert "small images" in r.situation and "45,000 training images" in r.situation
    assert f["precision"] == ("bf16" if recipes.cpu_has_bf16() else "fp32")


def test_a_small_set_gets_more_epochs_and_a_smaller_batch():
    sample = recipes.recommend("tutorial_net", pretrained=False, n_train=4_400, image_side=32)
    assert sample.fields["epochs"] == 40 and sample.fields["data.batch_size"] == 128
    tiny = recipes.recommend("resnet18", pretrained=False, n_train=300, image_side=32)
    batch = tiny.fields["data.batch_size"]
    assert batch < 128 and 300 / batch >= 10 and tiny.fields["optim.lr"] == pytest.approx(0.05 * batch / 128)
    assert tiny.fields["epochs"] == 40


def test_on_a_gpu_the_batch_is_larger_and_precision_mixed():
    gpu = recipes.recommend("cifar_fast", pretrained=False, n_train=50_000, image_side=32, device_type="cuda")
    assert gpu.fields["data.batch_size"] == 512 and gpu.fields["optim.lr"] == pytest.approx(0.2)
    assert gpu.fields["precision"] in ("bf16", "fp16")


def test_channels_last_on_the_cpu_where_measured_and_on_a_gpu_in_mixed_precision():
    import torch

    from core import trainer
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    config = RunConfig()
    config.model.name = "resnet18"
    assert not trainer.uses_channels_last(config, cpu)        # measured: +8 % in fp32, below the 10 % bar
    config.precision = "bf16"
    assert trainer.uses_channels_last(config, gpu) and trainer.uses_channels_last(config, cpu)   # +18 %
    config.model.name = "vit_b_16"
    assert not trainer.uses_channels_last(config, gpu)
    config.model.name = "mobilenet_v3_small"
    assert not trainer.uses_channels_last(config, cpu)        # 0.92× in bf16
    config.precision = "fp32"
    assert trainer.uses_channels_last(config, cpu)            # 1.40× in fp32


def test_bf16_only_where_it_measured_faster():
    if not recipes.cpu_has_bf16():
        pytest.skip("this CPU has no native bf16: every recipe is fp32 here")
    pick = lambda m: recipes.recommend(m, pretrained=False, n_train=5000, image_side=32).fields["precision"]
    assert pick("resnet18") == pick("cifar_fast") == "bf16"
    assert pick("mobilenet_v3_small") == pick("shufflenet_v2_x1_0") == pick("alexnet") == "fp32"
    imagenet_stem = recipes.recommend("resnet18", pretrained=False, n_train=5000, image_side=32, small_stem=False)
    assert imagenet_stem.fields["precision"] == "fp32"   # 8×8 maps and smaller: bf16 measured slower


def test_fine_tuning_and_transformers_have_their_own_recipes():
    ft = recipes.recommend("resnet18", pretrained=True, n_train=2_000, image_side=224)
    assert ft.fields["optim.lr"] == 0.01 and ft.fields["optim.head_lr"] == 0.1 and 3 <= ft.fields["epochs"] <= 10
    assert "fine-tuning" in ft.situation
    vit = recipes.recommend("vit_b_16", pretrained=False, n_train=50_000, image_side=224)
    assert vit.fields["optim.optimizer"] == "adamw" and vit.fields["optim.lr"] == 1e-3
    big = recipes.recommend("resnet18", pretrained=False, n_train=50_000, image_side=224)
    assert "large images" in big.situation


def test_apply_keeps_what_the_user_set_and_validates():
    r = recipes.recommend("tutorial_net", pretrained=False, n_train=4_400, image_side=32)
    base = RunConfig()
    base.optim.lr = 0.003
    out = recipes.apply(base, r, keep={"optim.lr"})
    assert out.optim.lr == 0.003 and out.optim.scheduler == "onecycle" and out.data.batch_size == 128
    assert base.optim.scheduler == "cosine"   # a copy: the given configuration is unchanged
    assert set(r.fields) <= set(recipes.FIELDS)
    assert "Recipe for training from scratch on small images (4,400 training images)" in r.describe()
    assert "None" not in r.describe()


def test_for_config_reads_the_training_split_of_the_real_sample(session_data_dir):
    r = recipes.for_config(RunConfig(), session_data_dir)
    assert "4,400 training images" in r.situation   # 5,000 train less 600 validation (0.1 of 6,000)
    assert r.fields["epochs"] == 40


def _printed(capsys, *argv) -> dict:
    from core.train import main
    assert main(list(argv) + ["--print-config"]) == 0
    out = capsys.readouterr()
    return {"config": json.loads(out.out), "err": out.err}


def test_the_command_line_fills_what_is_not_given_from_the_recipe(capsys, session_data_dir, tmp_path):
    dd = ["--data-dir", str(session_data_dir)]
    got = _printed(capsys, *dd)
    assert got["config"]["optim"]["scheduler"] == "onecycle" and got["config"]["epochs"] == 40
    assert got["err"].startswith("recipe for training from scratch on small images (4,400 training images): set ")
    given = _printed(capsys, *dd, "--lr", "0.01", "--set", "optim.scheduler=cosine", "--epochs", "3")
    assert given["config"]["optim"]["lr"] == 0.01 and given["config"]["optim"]["scheduler"] == "cosine"
    assert given["config"]["epochs"] == 3 and given["config"]["data"]["batch_size"] == 128
    adam = _printed(capsys, *dd, "--optimizer", "adam")["config"]["optim"]     # SGD's rate is not Adam's
    assert adam["optimizer"] == "adam" and adam["lr"] == RunConfig().optim.lr and adam["scheduler"] == "onecycle"
    small = _printed(capsys, *dd, "--batch-size", "32")["config"]["optim"]     # the rate follows the batch
    assert small["lr"] == pytest.approx(0.05 * 32 / 128)
    plain = _printed(capsys, *dd, "--no-recipe")["config"]
    assert plain == RunConfig().to_dict()
    saved = tmp_path / "run.json"
    RunConfig().save(saved)
    assert _printed(capsys, *dd, "--config", str(saved))["config"] == RunConfig().to_dict()   # used as it is
