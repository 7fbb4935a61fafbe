"""Config validation: every error class names the source, the dotted key, the value and what is expected."""
import pytest

from fmnist_dist import config


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_cover_every_schema_key():
    cfg = config.defaults()
    for key in config.SCHEMA:
        section, name = key.split(".")
        assert name in cfg[section]


def test_file_then_overrides(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  lr: 2e-3\n")
    cfg = config.load(path, ["train.epochs=5", "intel.itex=off", "train.target_accuracy=0.9", "intel.bind=off"])
    assert cfg["train"]["epochs"] == 5
    assert cfg["intel"]["bind"] == "off", "YAML 1.1 reads off as false; the key's choices take it back"
    assert cfg["train"]["lr"] == pytest.approx(2e-3)
    assert cfg["intel"]["itex"] == "off"
    assert cfg["train"]["target_accuracy"] == 0.9
    assert cfg["train"]["batch_size"] == config.SCHEMA["train.batch_size"].default


def test_integer_accepted_for_float_key(tmp_path):
    cfg = config.load(None, ["train.lr=1"])
    assert cfg["train"]["lr"] == 1.0 and isinstance(cfg["train"]["lr"], float)


@pytest.mark.parametrize("text, expected", [
    ("train:\n  epoch: 3\n", "c.yaml: train.epoch: unknown key (did you mean train.epochs?)"),
    ("trian:\n  epochs: 3\n", "c.yaml: trian: unknown key"),
    ("train:\n  epochs: three\n", "c.yaml: train.epochs: got 'three' (str); expected an integer in [1, 10000]"),
    ("train:\n  epochs: 0\n", "c.yaml: train.epochs: got 0 (int); expected an integer in [1, 10000]"),
    ("train:\n  epochs: true\n", "c.yaml: train.epochs: got True (bool); expected an integer"),
    ("train:\n  lr: -0.1\n", "c.yaml: train.lr: got -0.1 (float); expected a number >= 0.0"),
    ("intel:\n  itex: maybe\n", "c.yaml: intel.itex: got 'maybe' (str); expected one of auto, on, off"),
    ("train:\n  epochs: null\n", "c.yaml: train.epochs: got None (NoneType); expected an integer"),
    ("- 1\n- 2\n", "c.yaml: expected a mapping of sections"),
    ("train: [\n", "c.yaml: not valid YAML"),
])
def test_file_errors_name_file_key_value_expectation(tmp_path, text, expected):
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, text))
    assert expected in str(err.value)


def test_missing_file():
    with pytest.raises(config.ConfigError, match="nope.yaml: config file not found"):
        config.load("nope.yaml")


@pytest.mark.parametrize("item, expected", [
    ("train.batchsize=64", "--set train.batchsize=64: train.batchsize: unknown key (did you mean train.batch_size?)"),
    ("train.epochs", "--set train.epochs: expected dotted.key=value"),
    ("train.epochs=[1", "--set train.epochs=[1: value is not a YAML scalar"),
    ("data.val_size=60000", "data.val_size: got 60000 (int); expected an integer in [100, 50000]"),
])
def test_override_errors(item, expected):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, [item])
    assert expected in str(err.value)


@pytest.mark.parametrize("layers, expected", [
    ("[{type: conv}]", "model.layers[0].filters: missing; conv needs filters"),
    ("[{type: convolution, filters: 3}]", "model.layers[0].type: got 'convolution'; expected one of conv"),
    ("[{type: relu}, {type: dense, units: 0}]", "model.layers[1].units: got 0; expected a value in [1, 65536]"),
    ("[{type: dropout, rate: 2}]", "model.layers[0].rate: got 2.0; expected a value in [0.0, 0.95]"),
    ("[{type: conv, filters: 8, kernal: 3}]", "model.layers[0].kernal: unknown parameter for conv (did you mean kernel?)"),
    ("[{type: dense, units: '8'}]", "model.layers[0].units: got '8'; expected int"),
    ("[conv]", "model.layers[0]: got 'conv'; expected a mapping with a 'type'"),
])
def test_layer_errors(tmp_path, layers, expected):
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, f"model:\n  layers: {layers}\n"))
    assert expected in str(err.value)


def test_shipped_configs_are_valid():
    import glob
    paths = glob.glob("configs/*.yaml")
    assert paths
    for path in paths:
        config.load(path)


def test_dump_roundtrip(tmp_path):
    cfg = config.load("configs/default.yaml", ["train.epochs=2"])
    path = write(tmp_path, config.dump(cfg))
    assert config.load(path) == cfg
