"""Configuration: a schema owned by the code, plain YAML files, and `--set dotted.key=value` overrides.

Every key has a default here, so a YAML file only states what differs. Validation happens on load,
before any work, and every error names the source (file or `--set`), the dotted key, what was given
and what was expected.
"""
from __future__ import annotations

import copy
import difflib
import errno
import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import yaml

from .errors import ConfigError



@dataclass(frozen=True)
class Field:
    default: Any
    kind: type | tuple[type, ...]
    help: str
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    nullable: bool = False
    words: tuple = ()       # strings a numeric key also takes (e.g. "auto")
    before: Any = None      # a changed default's old value: what reports written before the change ran with


# Layer types are the seed study's set (conv, ReLU, pooling, dense, dropout) plus batch norm and
# flatten. Each layer is a mapping with `type` and the parameters below (name -> (kind, default)).
LAYER_PARAMS: dict[str, dict[str, tuple[type, Any]]] = {
    "conv": {"filters": (int, None), "kernel": (int, 3), "padding": (str, "same")},
    "relu": {},
    "maxpool": {"size": (int, 2)},
    "dense": {"units": (int, None)},
    "dropout": {"rate": (float, None)},
    "batchnorm": {"momentum": (float, 0.9)},
    "flatten": {},
}

# The default recipe's network (configs/default.yaml states the whole recipe; its keys equal these
# defaults, so `train` without --config trains it).
DEFAULT_LAYERS = [
    {"type": "conv", "filters": 32, "kernel": 3}, {"type": "batchnorm"}, {"type": "relu"}, {"type": "maxpool", "size": 2},
    {"type": "conv", "filters": 64, "kernel": 3}, {"type": "batchnorm"}, {"type": "relu"}, {"type": "maxpool", "size": 2},
    {"type": "conv", "filters": 128, "kernel": 3}, {"type": "batchnorm"}, {"type": "relu"}, {"type": "maxpool", "size": 2},
    {"type": "dropout", "rate": 0.1}, {"type": "flatten"},
    {"type": "dense", "units": 256}, {"type": "relu"}, {"type": "dropout", "rate": 0.25},
]
DEFAULT_CONFIG = "configs/default.yaml"
# What model.layers receives: one 28x28 grey image. training/model.py builds its input from it.
IMAGE_SHAPE = (28, 28, 1)
# Fashion-MNIST's home: data.url's default, and data.py's.
DATA_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

SCHEMA: dict[str, Field] = {
    "data.dir": Field(None, str, "directory holding the four IDX files (.gz or raw)", nullable=True),
    "data.download": Field(False, bool, "download the files when no local copy is found"),
    "data.url": Field(DATA_URL, str, "base URL for data.download"),
    "data.cache_dir": Field(None, str, "where downloads go (default ~/.cache/fmnist-dist)", nullable=True),
    "data.val_size": Field(5000, int, "validation images held out of the 60,000 training images",
                           min=100, max=50000),
    "model.layers": Field(DEFAULT_LAYERS, list, "layer list; a Dense(10) classifier is appended"),
    "model.first_conv_init": Field("whiten", str, "how the first layer (a convolution) starts: glorot, or whiten: "
                                   "filters that decorrelate the training images' patches, and their negatives "
                                   "(the rest Glorot), computed from the same images on every rank. Left at its "
                                   "default, a network that does not start with a convolution gets glorot",
                                   choices=("glorot", "whiten"), before="glorot"),
    "model.first_conv_frozen": Field(False, bool, "keep the first convolution's weights as they start (with "
                                     "whiten: a fixed whitening of the patches, as airbench's first layer): no "
                                     "weight gradient for it, and no backward pass through the layers between it "
                                     "and the first trained one"),
    "train.epochs": Field(22, int, "epochs to train", min=1, max=10000),
    "train.steps_per_epoch": Field(None, int, "cap on steps per epoch (short runs); default: the full shard",
                                   min=1, nullable=True),
    "train.batch_size": Field(256, int, "batch size per rank; with train.global_batch_size, the batch train.lr "
                              "is meant for", min=1, max=60000),
    "train.global_batch_size": Field("auto", int, "auto: the job picks the global batch that reaches the "
                                     "recipe's target soonest on this many ranks, from the recipe's measured "
                                     "accuracy basis (weak scaling where none matches, or where "
                                     "train.batch_size is not the basis's per-rank batch; a process whose share holds several of the "
                                     "basis's ranks trains them as simulated ranks; docs/scaling.md); a "
                                     "number: strong scaling, that global batch whatever the number of ranks, an "
                                     "equal share each (an error if it does not divide); null: weak scaling, "
                                     "train.batch_size per rank", min=1, max=60000, nullable=True, words=("auto",)),
    "train.simulate_world_size": Field(None, int, "train as this many ranks would, on fewer processes (a "
                                       "multiple of them): each process carries its share of the ranks' batches, "
                                       "batch norm normalizes each rank's batch on its own, and the learning-rate "
                                       "scaling, warm-up and schedule see this world size", min=1, max=4096,
                                       nullable=True),
    "train.large_batch_from": Field(4096, int, "from this global batch on, the large-batch recipe: Adam and "
                                    "AdamW become LAMB (layer-wise trust ratio) and the warm-up lasts at least 5 "
                                    "epochs (docs/scaling.md); null: never", min=1, nullable=True),
    "train.interconnect": Field("25gbe", str, "the network between nodes, for train.global_batch_size=auto's "
                                "allreduce cost (nominal figures, docs/scaling.md)",
                                choices=("10gbe", "25gbe", "100gbe", "hdr-ib")),
    "train.eval_batch_size": Field(1000, int, "batch size for validation and test", min=1, max=60000),
    "train.optimizer": Field("adam", str, "optimizer", choices=("adam", "adamw", "lamb", "sgd")),
    "train.lr": Field(1.5e-3, float, "learning rate for one rank (scaled by train.lr_scaling)", min=0.0),
    "train.lr_scaling": Field("linear", str, "how the learning rate grows with the global batch (x global "
                              "batch / train.batch_size: the number of ranks under weak scaling)",
                              choices=("linear", "sqrt", "none")),
    "train.warmup_epochs": Field(1.0, float, "linear warm-up from train.lr to the scaled rate", min=0.0),
    "train.schedule": Field("cosine", str, "learning-rate schedule after warm-up: constant, or a cosine or "
                            "linear decay to zero at the last step", choices=("constant", "cosine", "linear")),
    "train.momentum": Field(0.9, float, "SGD momentum", min=0.0, max=1.0),
    "train.weight_decay": Field(0.0, float, "weight decay (adamw, sgd: decoupled; lamb: within the layer-wise step)", min=0.0),
    "train.label_smoothing": Field(0.1, float, "label smoothing", min=0.0, max=0.5),
    "train.augment_flip": Field(True, bool, "random horizontal flips"),
    "train.alternate_flips": Field(True, bool, "with train.augment_flip: a coin per image decides whether it is "
                                   "mirrored in the first epoch, and each later epoch shows it the other way "
                                   "round, instead of a fresh coin every epoch. Left at its default, off when "
                                   "train.augment_flip is", before=False),
    "train.augment_shift": Field(0, int, "random shifts of up to this many pixels", min=0, max=8),
    "train.bn_bias_lr": Field(3.0, float, "the learning rate of batch norm's shifts (beta) as a multiple of "
                              "the other weights' (Adam, AdamW, LAMB and SGD alike)", min=0.0, before=1.0),
    "train.eval_flip": Field(True, bool, "evaluate (validation and test) on each image and its mirror image, "
                             "averaging the logits; the report also gives the one-view test accuracy. Only "
                             "for a model trained with train.augment_flip (without it: 2 points lower, measured)"),
    "train.eval_shift": Field(0, int, "also evaluate each test view moved by up to this many pixels in x and y "
                              "(every offset: 9 positions for 1), averaging the logits; for a model trained "
                              "with train.augment_shift. The per-epoch validation keeps train.eval_flip's "
                              "views", min=0, max=2),
    "train.target_accuracy": Field(None, float, "stop once validation accuracy reaches this",
                                   min=0.0, max=1.0, nullable=True),
    # 2**32 - 1: the largest seed numpy (so tf.keras.utils.set_random_seed) accepts.
    "train.seed": Field(42, int, "seed for weights, split and shuffling", min=0, max=2**32 - 1),
    "train.deterministic": Field(False, bool, "TensorFlow's op determinism (an error for an op without a "
                                 "deterministic kernel); with intel.mixed_precision=fp32 and one thread per rank, "
                                 "a run interrupted and resumed ends with the weights of an uninterrupted one, bit "
                                 "for bit (results.weights_sha256)"),
    "train.time_limit": Field(None, float, "seconds after the process started at which training stops "
                              "cleanly (checkpoint, partial report, exit 75); set it below the walltime",
                              min=1.0, nullable=True),
    "train.stop_check_steps": Field(10, int, "every N steps the ranks agree whether to stop (signal, time "
                                    "limit); a small allreduce", min=1),
    "train.stall_timeout": Field(90.0, float, "seconds without progress after which a job whose rank stopped "
                                 "responding ends, naming that rank (exit 124); 0 = never", min=0.0),
    "checkpoint.every_steps": Field(0, int, "also checkpoint every N steps inside an epoch; 0 = at epoch ends",
                                    min=0),
    "checkpoint.keep": Field(3, int, "checkpoints kept in RUN_DIR/checkpoints", min=1),
    "intel.onednn": Field(True, bool, "oneDNN kernels in TensorFlow (TF_ENABLE_ONEDNN_OPTS)"),
    "intel.itex": Field("auto", str, "Intel Extension for TensorFlow: auto loads it on nodes with native bf16 "
                        "(elsewhere it measured no gain); on: always, an error if it cannot load; off: never",
                        choices=("auto", "on", "off")),
    "intel.mixed_precision": Field("auto", str, "auto: bf16 (Keras policy) where every node's CPU has native "
                                   "bf16 (avx512_bf16, amx_bf16), else fp32; fp32; keras_bf16 or itex_bf16 (ITEX "
                                   "auto mixed precision): bf16, an error on a node without native bf16",
                                   choices=("auto", "fp32", "keras_bf16", "itex_bf16")),
    "intel.intra_op_threads": Field(0, int, "threads per rank; 0 = cores available to the rank", min=0),
    "intel.inter_op_threads": Field(0, int, "TensorFlow inter-op threads per rank; 0 = auto: a process carrying "
                                    "several simulated ranks runs them side by side, one thread each, else 1",
                                    min=0),
    "intel.bind": Field("auto", str, "auto: a rank that may run on every core of a node shared with other "
                        "ranks keeps to its slice of the cores (as mpirun --bind-to core would); off: never",
                        choices=("auto", "off")),
    "intel.kmp_affinity": Field("granularity=fine,compact,1,0", str, "KMP_AFFINITY for OpenMP runtimes"),
    "intel.kmp_blocktime": Field(1, int, "KMP_BLOCKTIME in ms", min=0),
    "report.timeline": Field(False, bool, "record Horovod's timeline (one file per epoch in RUN_DIR/timeline) "
                             "and split compute from communication with it; costs some speed. Off: the "
                             "split is estimated from a short allreduce probe at start-up"),
    "report.plots": Field(True, bool, "rank 0 writes PNG plots (accuracy/loss, images/s, time per rank) "
                          "into the run directory at the end"),
    "report.tensorboard": Field(True, bool, "rank 0 writes TensorBoard scalars into RUN_DIR/tensorboard"),
}


# Keys that leave the experiment as it was: where the data lives, what is reported, when to
# checkpoint or stop, the node's speed settings and its network. Runs that differ only in these are
# one recipe (compare, scans), and a resumed run may change them; every other key changes the result.
EXPERIMENT_NEUTRAL = ("data.dir", "data.download", "data.url", "data.cache_dir", "train.eval_batch_size",
                      "train.time_limit", "train.stop_check_steps", "train.stall_timeout", "train.interconnect",
                      "checkpoint.", "report.", "intel.onednn", "intel.itex", "intel.intra_op_threads",
                      "intel.inter_op_threads", "intel.bind", "intel.kmp_")


def experiment_key(cfg: dict, drop: tuple[str, ...] = ()) -> str:
    """A short hash of the config's experiment (EXPERIMENT_NEUTRAL and `drop` left out): equal for runs
    of one recipe. Keys a config predates count at the value runs had before the key existed (its default,
    or the old default of one that changed), so an older report keeps its key."""
    before = {k: f.before for k, f in SCHEMA.items() if f.before is not None}
    merged = {**flat(defaults()), **before, **flat(cfg)}
    kept = {k: v for k, v in merged.items() if not k.startswith(EXPERIMENT_NEUTRAL + tuple(drop))}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


def defaults() -> dict:
    """The full nested config with every key at its default."""
    cfg: dict = {}
    for key, field in SCHEMA.items():
        _set_dotted(cfg, key, copy.deepcopy(field.default))
    cfg["model"]["layers"] = _check_layers(cfg["model"]["layers"], "built-in default")
    return cfg


def load(path: str | None, overrides: list[str] = ()) -> dict:
    """Defaults, then the YAML file, then `--set` overrides; validated. Raises ConfigError."""
    cfg = defaults()
    given = set()
    if path:
        for key, value in _flatten(_read_yaml(path), path).items():
            _apply(cfg, key, value, path)
            given.add(key)
    for item in overrides:
        key, value = _parse_override(item)
        _apply(cfg, key, value, f"--set {item}")
        given.add(key)
    source = " and ".join([path] * bool(path) + ["--set"] * bool(overrides)) or "config"
    first = next(iter(cfg["model"]["layers"]), {"type": "missing"})
    # The default recipe's levers stay out of the way of a config they do not fit; asked for, they must fit.
    if "model.first_conv_init" not in given and first["type"] != "conv":
        cfg["model"]["first_conv_init"] = "glorot"
    if "train.alternate_flips" not in given and not cfg["train"]["augment_flip"]:
        cfg["train"]["alternate_flips"] = False
    if cfg["model"]["first_conv_init"] == "whiten" and first["type"] != "conv":
        raise ConfigError(f"{source}: model.first_conv_init is whiten but model.layers[0] is {first['type']}; "
                          "whitening sets the filters of a first convolution: put a conv layer first, or set "
                          "model.first_conv_init: glorot")
    if cfg["model"]["first_conv_frozen"] and first["type"] != "conv":
        raise ConfigError(f"{source}: model.first_conv_frozen is true but model.layers[0] is {first['type']}; only a "
                          "first convolution can be frozen: put a conv layer first, or set model.first_conv_frozen: false")
    if cfg["train"]["alternate_flips"] and not cfg["train"]["augment_flip"]:
        raise ConfigError(f"{source}: train.alternate_flips is true but train.augment_flip is false; alternate "
                          "flips only change how images are mirrored: set train.augment_flip: true, or drop "
                          "train.alternate_flips")
    return cfg


def namespace(cfg: dict) -> SimpleNamespace:
    """Attribute access for reading: ns.train.epochs."""
    return SimpleNamespace(**{k: SimpleNamespace(**v) for k, v in cfg.items()})


def flat(cfg: dict) -> dict[str, Any]:
    """The resolved config as dotted keys: {"train.epochs": 12, ...}."""
    return {f"{section}.{key}": value for section, values in cfg.items() for key, value in values.items()}


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def _read_yaml(path: str) -> dict:
    loader = _UniqueKeyLoader(_read_text(path), path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, intel, checkpoint, report), "
                          f"got {type(data).__name__}")
    return data


def _read_text(path: str) -> str:
    """The config file's text; ConfigError naming the path if it is not a readable UTF-8 file."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{path}: is a directory; expected a YAML config file")
        if not stat.S_ISREG(mode):  # a FIFO would block every rank forever; each rank opens the path
            raise ConfigError(f"{path}: not a regular file ({_file_kind(mode)}); expected a YAML config file")
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError(f"{path}: config file not found (a symlink to {os.readlink(path)}, "
                              "which does not exist)") from None
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        hint = " (a part of the path before the file name is a file)" if e.errno == errno.ENOTDIR else ""
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}{hint}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line}); "
                          "save the config as UTF-8") from None


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket"}
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (PyYAML keeps the last one silently). Keys are
    compared by dotted path over the whole file, so `train: {epochs: 3}` and a top-level
    `train.epochs: 5` collide too."""

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self.source = source

    def construct_document(self, node):
        self._check_keys(node, "", {}, set())
        return super().construct_document(node)

    def _check_keys(self, node, prefix: str, seen: dict[str, int], active: set[int]) -> None:
        if id(node) in active:  # a recursive alias
            return
        active.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_keys(item, f"{prefix}[{i}]", seen, active)
        elif isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # merged keys (<<) may be overridden; complex keys fail when constructed
                key = f"{prefix}.{self.construct_object(key_node)}" if prefix else str(self.construct_object(key_node))
                line = key_node.start_mark.line + 1
                if key in seen:
                    where = f"given twice on line {line}" if seen[key] == line else f"on lines {seen[key]} and {line}"
                    raise ConfigError(f"{self.source}: {key}: duplicate key {where}; give each key once")
                seen[key] = line
                self._check_keys(value_node, key, seen, active)
        active.discard(id(node))


def _flatten(tree: dict, source: str, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key not in SCHEMA:
            if not any(k.startswith(key + ".") for k in SCHEMA):
                raise ConfigError(_unknown_key_message(source, key))
            flat.update(_flatten(value, source, key + "."))
        else:
            flat[key] = value
    return flat


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected dotted.key=value, e.g. --set train.epochs=5")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}: value is not a YAML scalar: {e}") from None
    return key.strip(), value


def _apply(cfg: dict, key: str, value: Any, source: str) -> None:
    field = SCHEMA.get(key)
    if field is None:
        raise ConfigError(_unknown_key_message(source, key))
    value = _check(field, key, value, source)
    if key == "model.layers":
        value = _check_layers(value, source)
    _set_dotted(cfg, key, value)


def _check(field: Field, key: str, value: Any, source: str) -> Any:
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: got {value!r} ({type(value).__name__}); expected {expected}")

    if value is None:
        if field.nullable:
            return None
        raise fail(_describe(field))
    if isinstance(value, str) and field.words:
        if value in field.words:
            return value
        raise fail(_describe(field))
    kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and ("on" if value else "off") in field.choices:
        value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
    if float in kinds and isinstance(value, str):
        value = _yaml11_float(value)  # PyYAML reads 1e-3 (no dot) as a string
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise fail(_describe(field))
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every range comparison
        raise fail(_describe(field).replace("a number", "a finite number", 1))
    if field.choices and value not in field.choices:
        raise fail(_describe(field))
    if field.min is not None and value < field.min or field.max is not None and value > field.max:
        raise fail(_describe(field))
    return value


def _yaml11_float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _describe(field: Field) -> str:
    kind = field.kind.__name__ if isinstance(field.kind, type) else "/".join(k.__name__ for k in field.kind)
    text = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
            "list": "a list"}.get(kind, kind)
    if field.choices:
        text = "one of " + ", ".join(map(str, field.choices))
    if field.min is not None and field.max is not None:
        text += f" in [{field.min}, {field.max}]"
    elif field.min is not None:
        text += f" >= {field.min}"
    if field.words:
        text += "".join(f", or {w!r}" for w in field.words)
    if field.nullable:
        text += " (or null)"
    return text


def _check_layers(layers: list, source: str) -> list:
    checked = []
    types = ", ".join(LAYER_PARAMS)
    for i, layer in enumerate(layers):
        where = f"{source}: model.layers[{i}]"
        if not isinstance(layer, dict) or "type" not in layer:
            raise ConfigError(f"{where}: got {layer!r}; expected a mapping with a 'type' (one of {types})")
        kind = layer["type"]
        params = LAYER_PARAMS.get(kind)
        if params is None:
            hint = _suggest(str(kind), LAYER_PARAMS)
            raise ConfigError(f"{where}.type: got {kind!r}; expected one of {types}{hint}")
        out = {"type": kind}
        for name, given in layer.items():
            if name == "type":
                continue
            if name not in params:
                allowed = ", ".join(params) or "no parameters"
                raise ConfigError(f"{where}.{name}: unknown parameter for {kind}{_suggest(name, params)}; "
                                  f"{kind} takes {allowed}")
        for name, (ptype, default) in params.items():
            value = layer.get(name, default)
            if value is None:
                raise ConfigError(f"{where}.{name}: missing; {kind} needs {name}")
            if ptype is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, ptype):
                raise ConfigError(f"{where}.{name}: got {value!r}; expected {ptype.__name__}")
            out[name] = value
        _check_layer_ranges(out, where)
        checked.append(out)
    _check_layer_shapes(checked, source)
    return checked


def _check_layer_ranges(layer: dict, where: str) -> None:
    rules = {"filters": (1, 4096), "kernel": (1, 28), "size": (1, 28), "units": (1, 65536), "rate": (0.0, 0.95),
             "momentum": (0.0, 1.0)}
    for name, (lo, hi) in rules.items():
        if name in layer and not lo <= layer[name] <= hi:
            raise ConfigError(f"{where}.{name}: got {layer[name]!r}; expected a value in [{lo}, {hi}]")
    if layer.get("padding", "same") not in ("same", "valid"):
        raise ConfigError(f"{where}.padding: got {layer['padding']!r}; expected same or valid")


def _check_layer_shapes(layers: list[dict], source: str) -> None:
    """Follow one image through the layers as training/model.py builds them (Conv2D with stride 1,
    MaxPooling2D with stride = size and valid padding), so a stack Keras cannot build fails here,
    in pure Python, before Horovod and TensorFlow start."""
    shape, trail = IMAGE_SHAPE, [format_shape(IMAGE_SHAPE)]
    for i, layer in enumerate(layers):
        out, problem = _layer_output(layer, shape)
        if problem:
            params = " ".join(f"{k}={v}" for k, v in layer.items() if k != "type")
            raise ConfigError(f"{source}: model.layers[{i}] ({layer['type']}{' ' + params if params else ''}): "
                              f"input {format_shape(shape)}: {problem}; shapes before it: {' -> '.join(trail)}")
        if out != shape:
            trail.append(format_shape(out))
        shape = out


def trainable_parameters(layers: list[dict], first_conv_frozen: bool = False) -> int:
    """The network's trainable weights, from the same shape walk, with the Dense(10) classifier that
    training/model.py appends: what each step's allreduce carries (a test holds it to Keras' count)."""
    shape, total = IMAGE_SHAPE, 0
    flatten = [] if any(layer["type"] == "flatten" for layer in layers) else [{"type": "flatten"}]  # as model.py adds
    for i, layer in enumerate(layers + flatten + [{"type": "dense", "units": 10}]):
        if layer["type"] == "conv" and not (i == 0 and first_conv_frozen):
            total += layer["kernel"] ** 2 * shape[-1] * layer["filters"] + layer["filters"]
        elif layer["type"] == "dense":
            total += shape[-1] * layer["units"] + layer["units"]
        elif layer["type"] == "batchnorm":
            total += 2 * shape[-1]
        shape = _layer_output(layer, shape)[0]
    return total


def _layer_output(layer: dict, shape: tuple[int, ...]) -> tuple[tuple[int, ...], str | None]:
    """(output shape, None), or (shape, why the layer cannot take this input)."""
    kind = layer["type"]
    if kind == "flatten":
        return (math.prod(shape),), None
    if kind == "dense":  # Keras' Dense acts on the last axis of a feature map too
        return shape[:-1] + (layer["units"],), None
    if kind not in ("conv", "maxpool"):
        return shape, None
    if len(shape) == 1:
        return shape, f"a {kind} needs a 2-D feature map, but a flatten comes before it (move the flatten after it)"
    height, width, channels = shape
    if kind == "conv":
        k = layer["kernel"]
        shrink = k - 1 if layer["padding"] == "valid" else 0
        out, need = (height - shrink, width - shrink, layer["filters"]), f"a {k}x{k} kernel with padding valid"
        remedy = "use a smaller kernel, padding same, or less pooling before it"
    else:
        k = layer["size"]
        out, need = (height // k, width // k, channels), f"pooling {k}x{k}"
        remedy = "use a smaller size or fewer pooling layers"
    if min(out[:2]) < 1:
        return shape, f"the output would be {format_shape(out)} ({need} needs at least {k}x{k}); {remedy}"
    return out, None


def format_shape(shape: tuple[int, ...], separator: str = "x") -> str:
    """(28, 28, 1) -> '28x28x1' (a trail of layer shapes), or '28 x 28 x 1' with separator ' x '."""
    return separator.join(map(str, shape))


def _unknown_key_message(source: str, key: str) -> str:
    return f"{source}: {key}: unknown key{_suggest(key, SCHEMA)}"


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


# ---------------------------------------------------------------------------------- the docs page

DOCS_PAGE = "docs/configuration.md"
DOCS_BEGIN = "<!-- generated from config.SCHEMA by `python -m fmnist_dist.config`; do not edit -->"
DOCS_END = "<!-- end of generated table -->"


def markdown_table() -> str:
    """Every key with its default, what it accepts and what it means, as docs/configuration.md shows it."""
    rows = [DOCS_BEGIN, "| key | default | accepted | meaning |", "|---|---|---|---|"]
    for key, field in SCHEMA.items():
        if key == "model.layers":
            default = describe_layers(field.default)
        else:
            default = yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix("\n...").strip()
        rows.append(f"| `{key}` | `{default}` | {_describe(field)} | {field.help} |")
    return "\n".join(rows + [DOCS_END])


def describe_layers(layers: list[dict]) -> str:
    """One line, e.g. 'conv32k3-relu-maxpool2-...-dense10' (the classifier included)."""
    short = {"conv": lambda s: f"conv{s['filters']}k{s.get('kernel', 3)}", "dense": lambda s: f"dense{s['units']}",
             "maxpool": lambda s: f"maxpool{s.get('size', 2)}", "dropout": lambda s: f"dropout{s['rate']:g}"}
    parts = [short.get(s["type"], lambda s: s["type"])(s) for s in layers]
    return "-".join(parts + ["dense10"])


def write_docs(path: str = DOCS_PAGE) -> None:
    """Replace the generated table in the configuration page."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.index(DOCS_BEGIN), text.index(DOCS_END) + len(DOCS_END)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:start] + markdown_table() + text[end:])


if __name__ == "__main__":
    write_docs()

