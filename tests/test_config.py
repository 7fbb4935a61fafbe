"""Config validation: every error class names the source, the dotted key, the value and what is expected;
and the config's pure-Python shape walk held to what training/model.py builds in Keras."""
import copy
import json
import os
import subprocess

import pytest
import yaml

from conftest import PYTHON, ROOT, run_env, unavailable
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
    ("[{type: dropout, rate: .nan}]", "model.layers[0].rate: got nan; expected a value in [0.0, 0.95]"),
    ("[{type: batchnorm, momentum: .nan}]", "model.layers[0].momentum: got nan; expected a value in [0.0, 1.0]"),
    ("[{type: batchnorm, momentum: .inf}]", "model.layers[0].momentum: got inf; expected a value in [0.0, 1.0]"),
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


# ---------------------------------------------------------------- non-finite numbers, seed range

FLOAT_KEYS = [key for key, field in config.SCHEMA.items() if field.kind is float]
NON_FINITE = [("nan", "nan"), (".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("1e999", "inf"),
              ("1.0e999", "inf"), ("-1e999", "-inf")]


def test_float_keys_are_found():
    assert {"train.lr", "train.momentum", "train.target_accuracy", "train.time_limit"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text, shown", NON_FINITE)
def test_non_finite_floats_are_refused_from_set_and_file(tmp_path, key, text, shown):
    """nan compares false with every bound, inf passes a lower one: both used to get through."""
    with pytest.raises(config.ConfigError) as err:
        config.load(None, [f"{key}={text}"])
    assert f"--set {key}={text}: {key}: got {shown} (float); expected a finite number" in str(err.value)
    section, name = key.split(".")
    path = write(tmp_path, f"{section}:\n  {name}: {text}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"{path}: {key}: got {shown} (float); expected a finite number")


@pytest.mark.parametrize("seed", [2**32, 2**40, -1])
def test_seed_outside_32_bits_is_refused(seed):
    """numpy (so tf.keras.utils.set_random_seed) takes 0..2**32-1; 2**32 failed after Horovod started."""
    with pytest.raises(config.ConfigError) as err:
        config.load(None, [f"train.seed={seed}"])
    assert str(err.value) == (f"--set train.seed={seed}: train.seed: got {seed} (int); "
                              "expected an integer in [0, 4294967295]")


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seed_range_ends_are_accepted(seed):
    assert config.load(None, [f"train.seed={seed}"])["train"]["seed"] == seed


# ---------------------------------------------------------------- duplicate keys

@pytest.mark.parametrize("text, expected", [
    ("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 4\n", "train.epochs: duplicate key on lines 2 and 4"),
    ("train:\n  epochs: 3\n  'epochs': 4\n", "train.epochs: duplicate key on lines 2 and 3"),
    ("train:\n  epochs: 3\nintel:\n  itex: off\ntrain:\n  lr: 0.1\n", "train: duplicate key on lines 1 and 5"),
    ("train:\n  epochs: 3\ntrain.epochs: 5\n", "train.epochs: duplicate key on lines 2 and 3"),
    ("model:\n  layers:\n    - {type: relu}\n    - {type: conv, filters: 8, filters: 9}\n",
     "model.layers[1].filters: duplicate key given twice on line 4"),
])
def test_duplicate_keys_name_file_key_and_lines(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(err.value) == f"{path}: {expected}; give each key once"


def test_merge_key_override_is_not_a_duplicate(tmp_path):
    cfg = config.load(write(tmp_path, "train:\n  <<: {epochs: 3, lr: 0.5}\n  epochs: 4\n"))
    assert cfg["train"]["epochs"] == 4 and cfg["train"]["lr"] == 0.5


def test_recursive_alias_is_an_error_not_a_hang(tmp_path):
    path = write(tmp_path, "a: &x [*x]\n")
    with pytest.raises(config.ConfigError, match=r"c\.yaml: a: unknown key"):
        config.load(path)


# ---------------------------------------------------------------- config files that cannot be read

def test_config_path_is_a_directory(tmp_path):
    with pytest.raises(config.ConfigError) as err:
        config.load(str(tmp_path))
    assert str(err.value) == f"{tmp_path}: is a directory; expected a YAML config file"


@pytest.mark.parametrize("raw, offset, line", [
    ("train:\n  epochs: 3\n".encode("utf-16"), 0, 1),                    # a UTF-16 file with its BOM
    (b"train:\n  # caf\xe9 (Latin-1)\n  epochs: 3\n", 14, 2),
])
def test_config_not_utf8(tmp_path, raw, offset, line):
    path = tmp_path / "c.yaml"
    path.write_bytes(raw)
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path))
    assert str(err.value) == (f"{path}: not UTF-8 text: byte 0x{raw[offset]:02x} at offset {offset} "
                              f"(line {line}); save the config as UTF-8")


def test_config_utf8_with_bom_is_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("\ufefftrain:\n  epochs: 3\n".encode("utf-8"))
    assert config.load(str(path))["train"]["epochs"] == 3


def test_config_unreadable(tmp_path):
    """Unreadable in ways that hold for root too (tests run as root; chmod 000 does not stop root):
    a path through a file, a symlink loop, a dangling symlink, and a FIFO (which would block every
    rank forever in open())."""
    (tmp_path / "file").write_text("x\n")
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "gone.yaml")
    os.mkfifo(tmp_path / "fifo.yaml")
    expected = {
        "file/c.yaml": "cannot read the config file: Not a directory "
                       "(a part of the path before the file name is a file)",
        "loop.yaml": "cannot read the config file: Too many levels of symbolic links",
        "dangling.yaml": f"config file not found (a symlink to {tmp_path / 'gone.yaml'}, which does not exist)",
        "fifo.yaml": "not a regular file (a FIFO); expected a YAML config file",
    }
    for name, message in expected.items():
        with pytest.raises(config.ConfigError) as err:
            config.load(str(tmp_path / name))
        assert str(err.value) == f"{tmp_path / name}: {message}"


# ---------------------------------------------------------------- layer shapes

# Stacks the shape walk refuses (with its message); test_stacks_the_walk_refuses_keras_refuses_too builds them.
REFUSED_STACKS = [
    ("[" + ", ".join(["{type: maxpool, size: 2}"] * 5) + "]",
     "model.layers[4] (maxpool size=2): input 1x1x1: the output would be 0x0x1 (pooling 2x2 needs at least 2x2); "
     "use a smaller size or fewer pooling layers; shapes before it: 28x28x1 -> 14x14x1 -> 7x7x1 -> 3x3x1 -> 1x1x1"),
    ("[{type: conv, filters: 8, kernel: 5, padding: valid}, {type: maxpool, size: 4}, "
     "{type: conv, filters: 4, kernel: 7, padding: valid}]",
     "model.layers[2] (conv filters=4 kernel=7 padding=valid): input 6x6x8: the output would be 0x0x4 (a 7x7 "
     "kernel with padding valid needs at least 7x7); use a smaller kernel, padding same, or less pooling before "
     "it; shapes before it: 28x28x1 -> 24x24x8 -> 6x6x8"),
    ("[{type: flatten}, {type: relu}, {type: conv, filters: 3}]",
     "model.layers[2] (conv filters=3 kernel=3 padding=same): input 784: a conv needs a 2-D feature map, but a "
     "flatten comes before it (move the flatten after it); shapes before it: 28x28x1 -> 784"),
    ("[{type: conv, filters: 2}, {type: dense, units: 5}, {type: flatten}, {type: maxpool}]",
     "model.layers[3] (maxpool size=2): input 3920: a maxpool needs a 2-D feature map, but a flatten comes "
     "before it (move the flatten after it); shapes before it: 28x28x1 -> 28x28x2 -> 28x28x5 -> 3920"),
]


@pytest.mark.parametrize("layers, expected", REFUSED_STACKS)
def test_layer_stacks_that_cannot_build(tmp_path, layers, expected):
    path = write(tmp_path, f"model:\n  layers: {layers}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(err.value) == f"{path}: {expected}"


# Corner cases the shape walk accepts; test_the_shape_walk_is_what_keras_builds builds them.
ACCEPTED_STACKS = [
    "[{type: conv, filters: 4, kernel: 28, padding: valid}]",              # exactly 1x1
    "[{type: maxpool, size: 27}]",                                         # 28 // 27 = 1
    "[{type: conv, filters: 4}, {type: dense, units: 8}]",                 # Dense on the last axis, flatten added
    "[{type: dense, units: 8}, {type: flatten}, {type: batchnorm}, {type: flatten}, {type: dense, units: 4}]",
]


@pytest.mark.parametrize("layers", ACCEPTED_STACKS)
def test_layer_stacks_keras_builds_are_accepted(layers):
    config.load(None, [f"model.layers={layers}"])


# ---------------------------------------------------------------- the shape walk against Keras

def stacks_to_build() -> dict[str, str]:
    """Every stack the tests use, as a config path or a model.layers value: the shipped configs, the
    accepted corner cases, the empty stack (test_scaling) and the simulation test's network."""
    from test_simulation import NETWORK
    stacks = {f"configs/{path.name}": f"configs/{path.name}" for path in sorted((ROOT / "configs").glob("*.yaml"))}
    stacks.update({text: text for text in ACCEPTED_STACKS})
    stacks["[]"] = "[]"
    stacks["test_simulation.NETWORK"] = json.dumps(yaml.safe_load(NETWORK)["model"]["layers"])
    return stacks


STACKS_TO_BUILD = stacks_to_build()


def validated_layers(source: str) -> list[dict]:
    if source.endswith(".yaml"):
        return config.load(str(ROOT / source))["model"]["layers"]
    return config.load(None, [f"model.layers={source}"])["model"]["layers"]


def with_defaults(text: str) -> list[dict]:
    """A stack config.load refuses, with each layer's parameter defaults filled in as it would."""
    return [{**{name: default for name, (_, default) in config.LAYER_PARAMS[spec["type"]].items()}, **spec}
            for spec in yaml.safe_load(text)]


# Run in a fresh process: environment.prepare before TensorFlow loads, as the command line does.
# Reads {name: layers} on stdin; prints {name: each layer's output shape without the batch axis
# and the trainable parameter count, or Keras' refusal}.
KERAS_BUILD = """
import json, sys
from fmnist_dist import config
from fmnist_dist import environment
environment.prepare(config.namespace(config.defaults()))
from fmnist_dist.training.model import build_model

def built(layers):
    try:
        model = build_model(layers, seed=0)
    except ValueError as e:
        return {"refused": str(e).strip()}
    return {"shapes": [list(layer.output.shape[1:]) for layer in model.layers],
            "trainable": sum(int(v.shape.num_elements()) for v in model.trainable_variables)}

print(json.dumps({name: built(layers) for name, layers in json.load(sys.stdin).items()}))
"""


@pytest.fixture(scope="module")
def keras_builds() -> dict[str, dict]:
    stacks = {name: validated_layers(source) for name, source in STACKS_TO_BUILD.items()}
    stacks.update({f"refused {text}": with_defaults(text) for text, _ in REFUSED_STACKS})
    proc = subprocess.run([PYTHON, "-c", KERAS_BUILD], input=json.dumps(stacks), cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    if "No module named 'tensorflow'" in proc.stderr:
        unavailable(f"no TensorFlow in {PYTHON} (run: bash scripts/setup.sh test)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def walked_shapes(layers: list[dict]) -> list[list[int]]:
    """Each layer's output shape as config._layer_output follows one image through the stack."""
    shape, shapes = config.IMAGE_SHAPE, []
    for layer in layers:
        shape, problem = config._layer_output(layer, shape)
        assert problem is None, problem
        shapes.append(list(shape))
    return shapes


@pytest.mark.parametrize("name", STACKS_TO_BUILD)
def test_the_shape_walk_is_what_keras_builds(keras_builds, name):
    """Layer by layer, the walk's shapes are Keras' (then model.py's Flatten if none, and the
    Dense(10) logits), and config.trainable_parameters is the model's trainable weight count."""
    layers, built = validated_layers(STACKS_TO_BUILD[name]), keras_builds[name]
    assert "refused" not in built, f"{name}: the config accepts this stack, Keras refuses it: {built.get('refused')}"
    walked = walked_shapes(layers)
    assert built["shapes"][:len(layers)] == walked, f"{name}: Keras' shapes, then the walk's: " \
        f"{built['shapes'][:len(layers)]} != {walked}"
    assert built["shapes"][-1] == [10]
    assert config.trainable_parameters(layers) == built["trainable"], \
        f"{name}: config.trainable_parameters gives {config.trainable_parameters(layers)}, Keras {built['trainable']}"


@pytest.mark.parametrize("text", [text for text, _ in REFUSED_STACKS])
def test_stacks_the_walk_refuses_keras_refuses_too(keras_builds, text):
    assert "refused" in keras_builds[f"refused {text}"], f"Keras built {text}, which the config refuses"


def test_alternate_flips_without_flips_is_refused_naming_both_keys_and_where(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  alternate_flips: true\n")
    assert config.load(str(path))["train"]["alternate_flips"] is True          # flips are on by default
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path), ["train.augment_flip=false"])
    assert str(e.value).startswith(f"{path} and --set: train.alternate_flips is true but train.augment_flip "
                                   "is false")


@pytest.mark.parametrize("override, key, value", [
    ("train.augment_flip=false", "train.alternate_flips", False),
    ('model.layers=[{"type": "maxpool", "size": 2}, {"type": "conv", "filters": 8}]', "model.first_conv_init", "glorot"),
])
def test_the_default_recipes_levers_step_aside_where_they_do_not_fit(override, key, value):
    """Left at their defaults they switch off (asked for, they are refused: the tests above)."""
    assert config.flat(config.load(None))[key] != value
    assert config.flat(config.load(None, [override]))[key] == value


def test_a_report_older_than_a_changed_default_keeps_its_experiment_key():
    """A run written before model.first_conv_init, train.alternate_flips and train.bn_bias_lr existed
    ran with glorot, fresh coins and 1.0: its config, which lacks them, keys as one that states those."""
    lean = config.load(str(ROOT / "configs/lean.yaml"))
    older = copy.deepcopy(lean)
    for section, key in (("model", "first_conv_init"), ("train", "alternate_flips"), ("train", "bn_bias_lr")):
        del older[section][key]
    assert config.experiment_key(older) == config.experiment_key(lean)
    default = config.load(str(ROOT / "configs/default.yaml"))
    older_default = copy.deepcopy(default)
    del older_default["model"]["first_conv_init"]
    assert config.experiment_key(older_default) != config.experiment_key(default)
