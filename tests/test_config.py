"""RunConfig: defaults, JSON round-trip, and clear messages for unknown or invalid fields."""
import json

import pytest

from core.config import RunConfig
from core.errors import ConfigError


def test_defaults_are_valid_and_round_trip_through_json(tmp_path):
    cfg = RunConfig()
    cfg.optim.lr = 0.05
    cfg.data.train_augment = [{"name": "RandomHorizontalFlip", "params": {"p": 0.5}}]
    path = tmp_path / "run.json"
    cfg.save(path)
    again = RunConfig.load(path)
    assert again == cfg
    assert json.loads(path.read_text())["optim"]["lr"] == 0.05


def test_unknown_field_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"optim": {"learning_rate": 0.1}})
    msg = str(err.value)
    assert "optim.learning_rate" in msg and "optim.lr" in msg


def test_unknown_top_level_field():
    with pytest.raises(ConfigError, match="epochz"):
        RunConfig.from_dict({"epochz": 3})


@pytest.mark.parametrize("raw, field", [
    ({"optim": {"lr": -1}}, "optim.lr"),
    ({"optim": {"optimizer": "lbfgs"}}, "optim.optimizer"),
    ({"optim": {"scheduler": "warm"}}, "optim.scheduler"),
    ({"data": {"batch_size": 0}}, "data.batch_size"),
    ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, "val_fraction + data.test_fraction"),
    ({"data": {"source": "folder"}}, "data.location"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": "five"}, "epochs"),
    ({"precision": "fp8"}, "precision"),
    ({"device": "tpu"}, "device"),
    ({"model": {"freeze": "stages", "freeze_stages": 0}}, "model.freeze_stages"),
    ({"optim": {"class_weights": "inverse"}}, "optim.class_weights"),
    ({"model": {"pretrained": "yes"}}, "model.pretrained"),
])
def test_invalid_values_name_the_field(raw, field):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(raw)
    assert field in str(err.value)


@pytest.mark.parametrize("raw, field, allowed", [
    # wrong types that used to escape as a TypeError from a comparison
    ({"data": {"image_size": "x"}}, "data.image_size", "whole number or empty"),
    ({"optim": {"class_weights": ["a"]}}, "optim.class_weights", "list of numbers >= 0"),
    # values that used to be accepted silently
    ({"optim": {"milestones": "x"}}, "optim.milestones", "list of epoch numbers (whole numbers >= 1)"),
    ({"optim": {"milestones": [-1]}}, "optim.milestones", "list of epoch numbers (whole numbers >= 1)"),
    ({"optim": {"class_weights": 5}}, "optim.class_weights", "'balanced'"),
    ({"optim": {"lr": float("inf")}}, "optim.lr", "finite number"),
    ({"optim": {"lr": float("nan")}}, "optim.lr", "finite number"),
    ({"optim": {"weight_decay": float("nan")}}, "optim.weight_decay", "finite number"),
    ({"model": {"name": 5}}, "model.name", "text (a model name"),
    ({"data": {"location": 5}}, "data.location", "text (a torchvision set name, or a folder"),
    ({"data": {"train_augment": "x"}}, "data.train_augment", "list of transform steps"),
    ({"data": {"train_augment": [{"params": {}}]}}, "data.train_augment step 1", '"name"'),
    ({"optim": {"warmup_epochs": 3}, "epochs": 3}, "optim.warmup_epochs", "less than epochs (3)"),
    ({"device": 0}, "device", "'auto', 'cpu', 'cuda'"),
])
def test_wrong_types_and_values_say_which_field_and_what_is_allowed(raw, field, allowed):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(raw)
    msg = str(err.value)
    assert field in msg and allowed in msg, msg


def test_configs_built_in_python_are_checked_the_same_way():
    """validate() also runs on a config changed attribute by attribute (the UI and tests do)."""
    cfg = RunConfig()
    cfg.data.image_size = "x"
    with pytest.raises(ConfigError, match="data.image_size must be a whole number"):
        cfg.validate()
    cfg = RunConfig()
    cfg.optim.class_weights = [1.0, "a"]
    with pytest.raises(ConfigError, match="optim.class_weights"):
        cfg.validate()
    cfg = RunConfig()
    cfg.optim.warmup_epochs, cfg.epochs = 2, 3
    cfg.optim.milestones = [2, 3]
    cfg.optim.class_weights = [1, 0.5, 2]
    cfg.data.train_augment = [{"name": "RandomHorizontalFlip"}]
    assert cfg.validate() is cfg


def test_integers_are_accepted_for_float_fields_and_whole_floats_for_ints():
    cfg = RunConfig.from_dict({"optim": {"lr": 1}, "epochs": 3.0, "data": {"image_size": 32.0}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.data.image_size == 32 and isinstance(cfg.data.image_size, int)


def test_bad_json_text_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.from_json("{epochs: 3")
    with pytest.raises(ConfigError, match="Cannot read"):
        RunConfig.load(tmp_path / "missing.json")


@pytest.mark.parametrize("field, value, words", [
    ("optim.lr", 1e308, "optim.lr must be a number > 0 and at most 100"),
    ("optim.head_lr", 1e9, "optim.head_lr must be a number > 0 and at most 100"),
    ("seed", 2**70, "seed must be a whole number from 0 to 4,294,967,295"),
    ("seed", -1, "seed must be a whole number from 0"),
    ("data.split_seed", 2**40, "data.split_seed must be a whole number from 0"),
])
def test_typos_of_huge_rates_and_seeds_are_refused_before_a_run(field, value, words):
    """Through the API a page can send any number; these used to start a run that failed with an
    internal error (a seed NumPy refuses) or trained straight into NaN."""
    raw = RunConfig().to_dict()
    *parents, leaf = field.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=words):
        RunConfig.from_dict(raw)


def test_an_augmentation_that_would_blow_up_images_is_refused_with_the_config():
    """A spec arriving in a config (a resumed or API-built run), not only through the Data tab."""
    raw = RunConfig().to_dict()
    raw["data"]["train_augment"] = [{"name": "Pad", "params": {"padding": 30000}}]
    with pytest.raises(ConfigError, match="Pad.*the limit is 4,096 px a side"):
        RunConfig.from_dict(raw)
    deep: list = [{"name": "RandomHorizontalFlip"}]
    for _ in range(3000):
        deep = [{"name": "RandomApply", "params": {"transforms": deep}}]
    raw["data"]["train_augment"] = deep
    with pytest.raises(ConfigError):
        RunConfig.from_dict(raw)


def test_optimizers_sources_and_precisions_have_one_home():
    """One registry each, read by config validation, the trainer and the memory calculator alike."""
    from core import choices, config, datasets, memory

    assert config.OPTIMIZERS is choices.OPTIMIZERS is memory.OPTIMIZERS
    assert config.PRECISIONS is choices.PRECISIONS and list(memory.PRECISIONS) == choices.PRECISIONS.names()
    assert config.SOURCES is datasets.SOURCES
    for name in choices.OPTIMIZERS.names():   # adagrad included: the memory calculator had it, the trainer not
        RunConfig.from_dict({"optim": {"optimizer": name}})
    for name in choices.PRECISIONS.names():
        RunConfig.from_dict({"precision": name})


@pytest.mark.parametrize("raw, message", [
    ({"optim": {"optimizer": "lamb"}}, "optim.optimizer must be one of sgd, adam, adamw, rmsprop, adagrad; got 'lamb'."),
    ({"precision": "fp8"}, "precision must be one of fp32, bf16, fp16; got 'fp8'."),
    ({"data": {"source": "s3"}}, "data.source must be one of sample, folder, zip, index, torchvision; got 's3'."),
])
def test_an_unknown_choice_names_it_and_what_is_allowed(raw, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(raw)
    assert str(err.value) == message


def test_the_plateau_patience_is_a_validated_setting():
    assert RunConfig().optim.plateau_patience == 2   # what ReduceLROnPlateau was always given
    assert RunConfig.from_dict({"optim": {"plateau_patience": 0}}).optim.plateau_patience == 0
    for bad in (-1, 1.5, "two"):
        with pytest.raises(ConfigError, match="optim.plateau_patience"):
            RunConfig.from_dict({"optim": {"plateau_patience": bad}})
