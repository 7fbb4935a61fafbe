"""The optimizer and learning-rate schedule (fmnist_dist.training.optim): LAMB's layer-wise step,
and the large-batch recipe that the global batch switches on. Real TensorFlow, no training."""
from __future__ import annotations

import types

import numpy as np
import pytest

from conftest import require_module
from fmnist_dist import config as config_mod
from fmnist_dist.scaling import plan_batches

tf = require_module("tensorflow")
from fmnist_dist.training import optim  # noqa: E402  (after TensorFlow, as the training imports it)


def train_section(**overrides) -> types.SimpleNamespace:
    cfg = config_mod.load(None, [f"train.{k}={v}" for k, v in overrides.items()])
    return config_mod.namespace(cfg).train


@pytest.mark.parametrize("world, large", [(2, False), (8, False), (16, True), (32, True)])
def test_the_large_batch_recipe_starts_at_train_large_batch_from(world, large):
    t = train_section(simulate_world_size=world)                # 256 per rank: 512 ... 8192
    batches = plan_batches(vars(t), 1)
    assert batches.large is large
    record = optim.recipe(t, batches)
    if large:
        assert record == {"recipe": "large-batch", "optimizer": "lamb", "warmup_epochs": 5.0}
    else:
        assert record == {"recipe": "standard", "optimizer": "adam", "warmup_epochs": t.warmup_epochs}


def test_the_large_batch_recipe_can_be_turned_off_and_leaves_sgd_alone():
    t = train_section(simulate_world_size=32, large_batch_from="null")
    assert optim.recipe(t, plan_batches(vars(t), 1))["recipe"] == "standard"
    t = train_section(simulate_world_size=32, optimizer="sgd")
    assert optim.recipe(t, plan_batches(vars(t), 1)) == {"recipe": "large-batch", "optimizer": "sgd",
                                                          "warmup_epochs": 5.0}


def test_the_large_batch_warm_up_is_counted_in_epochs_of_the_large_batch():
    t = train_section(simulate_world_size=32)                   # 8192: 6 steps per epoch of 55,000
    schedule = optim.lr_schedule(t, plan_batches(vars(t), 1), steps_per_epoch=6)
    assert schedule.warmup_steps == 30 and schedule.peak_lr == pytest.approx(t.lr * 32)
    assert float(schedule(0)) == pytest.approx(t.lr) and float(schedule(30)) == pytest.approx(t.lr * 32)


def test_lamb_moves_each_layer_by_the_rate_times_its_own_norm():
    """Two weight matrices a thousandfold apart in scale, the same gradient: Adam moves both by the
    same amount; LAMB moves each by lr x its norm. A zero vector (a fresh bias) takes Adam's step."""
    rng = np.random.default_rng(0)
    big = tf.Variable(rng.normal(size=(8, 4)).astype("float32") * 10)
    small = tf.Variable(rng.normal(size=(8, 4)).astype("float32") / 100)
    bias = tf.Variable(np.zeros(4, "float32"))
    grads = [tf.constant(rng.normal(size=(8, 4)).astype("float32")) for _ in range(2)] + [tf.ones(4)]
    before = [v.numpy().copy() for v in (big, small, bias)]
    lr = 0.01
    optim.Lamb(lr).apply_gradients(zip(grads, [big, small, bias]))
    for var, old in zip((big, small), before):
        moved = np.linalg.norm(var.numpy() - old) / np.linalg.norm(old)
        assert moved == pytest.approx(lr, rel=1e-4)
    np.testing.assert_allclose(bias.numpy(), -lr * np.ones(4), rtol=1e-4)   # Adam's first step: lr x sign


def test_lamb_survives_the_config_round_trip_horovod_makes():
    """hvd.DistributedOptimizer rebuilds the optimizer from its class and config."""
    original = optim.Lamb(optim.WarmupSchedule(1e-3, 3.2e-2, 30, 120, True), lamb_weight_decay=0.01)
    rebuilt = optim.Lamb.from_config(original.get_config())
    assert rebuilt.lamb_weight_decay == 0.01 and float(rebuilt.learning_rate) == pytest.approx(1e-3)


def test_the_linear_schedule_decays_to_zero_after_the_warm_up_and_survives_the_round_trip():
    schedule = optim.WarmupSchedule(1e-3, 4e-3, 10, 110, cosine=False, linear=True)
    assert float(schedule(0)) == pytest.approx(1e-3) and float(schedule(10)) == pytest.approx(4e-3)
    assert float(schedule(60)) == pytest.approx(2e-3) and float(schedule(110)) == pytest.approx(0.0)
    assert optim.WarmupSchedule.from_config(schedule.get_config()).linear is True
    t = train_section(schedule="linear")
    assert optim.lr_schedule(t, plan_batches(vars(t), 1), steps_per_epoch=10).linear is True


@pytest.mark.parametrize("make", [lambda s, k: optim.Adam(s, bn_bias_lr=k), lambda s, k: optim.SGD(s, bn_bias_lr=k),
                                  lambda s, k: optim.Lamb(s, bn_bias_lr=k), lambda s, k: optim.AdamW(s, bn_bias_lr=k)],
                         ids=["adam", "sgd", "lamb", "adamw"])
def test_bn_bias_lr_multiplies_the_step_of_batch_norms_shift_and_of_nothing_else(make):
    """The same model and gradients with train.bn_bias_lr 1 and 3: only the batch norm's beta moves
    three times as far; its scale (gamma) and the dense layer's bias move as before."""
    def steps(k: float) -> dict:
        tf.keras.utils.set_random_seed(0)
        model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(4),
                                     tf.keras.layers.BatchNormalization()])
        before = {v.name: v.numpy().copy() for v in model.trainable_variables}
        opt = make(0.01, k)
        rebuilt = type(opt).from_config(opt.get_config())          # as hvd.DistributedOptimizer does
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(tf.ones((8, 3)), training=True) * tf.constant([1.0, -2.0, 3.0, 0.5]))
        grads = tape.gradient(loss, model.trainable_variables)
        rebuilt.apply_gradients(zip(grads, model.trainable_variables))
        return {v.name.split("/", 1)[1]: v.numpy() - before[v.name] for v in model.trainable_variables}
    plain, faster = steps(1.0), steps(3.0)
    assert set(plain) == {"kernel:0", "bias:0", "gamma:0", "beta:0"}
    assert np.abs(plain["beta:0"]).max() > 0
    np.testing.assert_allclose(faster["beta:0"], 3 * plain["beta:0"], rtol=1e-5)
    for name in ("kernel:0", "bias:0", "gamma:0"):
        np.testing.assert_allclose(faster[name], plain[name], rtol=1e-6)
