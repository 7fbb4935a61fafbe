"""model.first_conv_init: whiten (training/model.py): the first convolution starts as filters that
decorrelate the real training images' patches. Real TensorFlow and the real data, no training."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import require_module
from test_data import real  # noqa: F401  (the module-scoped fixture: the real dataset, loaded once)
from fmnist_dist import config as config_mod
from fmnist_dist.errors import ConfigError
from fmnist_dist.scaling import plan_batches

tf = require_module("tensorflow")
from fmnist_dist.training import model as model_mod  # noqa: E402  (after TensorFlow, as the training imports it)


def build(config: str | None, *sets: str, train_images=None) -> tf.keras.Model:
    ns = config_mod.namespace(config_mod.load(config, list(sets)))
    model, _, _ = model_mod.build_and_compile(ns, plan_batches(ns.train, 1), 100, train_images=train_images)
    return model


def first_conv(model: tf.keras.Model) -> tuple[np.ndarray, np.ndarray]:
    kernel, bias = model.layers[0].get_weights()
    return kernel.reshape(-1, kernel.shape[-1]), bias


def test_whitening_filters_decorrelate_the_patches_and_come_in_sign_pairs(real):
    images = real.x_train[:20_000]
    weights, bias = first_conv(build("configs/fast.yaml", "model.first_conv_init=whiten", train_images=images))
    assert weights.shape == (9, 16)                      # 3x3x1 patches: 8 leading directions and their negatives
    np.testing.assert_array_equal(weights[:, 8:], -weights[:, :8])
    np.testing.assert_array_equal(bias, 0.0)
    assert np.abs(weights).max() == pytest.approx(model_mod.WHITEN_MAX_WEIGHT)
    # On patches of other images than those it was computed from, the 8 filters' outputs are uncorrelated.
    outputs = model_mod._patches(real.x_train[-5_000:], 3, 3) @ weights[:, :8]
    correlation = np.corrcoef(outputs, rowvar=False)
    off_diagonal = correlation[~np.eye(8, dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.05, correlation.round(3)
    # and the leading one carries the most variance (eigenvalues in falling order)
    variances = np.diag(weights[:, :8].T @ np.cov(model_mod._patches(images[:2000], 3, 3), rowvar=False) @ weights[:, :8])
    assert np.argmax(variances / np.linalg.norm(weights[:, :8], axis=0) ** 2) == 0


def test_filters_beyond_twice_the_patch_size_keep_their_glorot_start(real):
    images = real.x_train[:5_000]
    glorot, glorot_bias = first_conv(build(None, "model.first_conv_init=glorot"))   # the default network: 32 filters
    whitened, bias = first_conv(build(None, "model.first_conv_init=whiten", train_images=images))
    assert whitened.shape == (9, 32)
    np.testing.assert_array_equal(whitened[:, 9:18], -whitened[:, :9])   # all 9 directions of a 3x3 patch
    np.testing.assert_array_equal(whitened[:, 18:], glorot[:, 18:])
    np.testing.assert_array_equal(bias, glorot_bias)                        # Keras starts biases at zero
    assert not np.allclose(whitened[:, :18], glorot[:, :18])


def test_the_whitening_is_a_function_of_the_images_alone(real):
    """Every rank computes it from the same training split: equal images, equal weights, any seed."""
    images = real.x_train[:5_000]
    one, _ = first_conv(build("configs/fast.yaml", "model.first_conv_init=whiten", "train.seed=1", train_images=images))
    two, _ = first_conv(build("configs/fast.yaml", "model.first_conv_init=whiten", "train.seed=2", train_images=images))
    np.testing.assert_array_equal(one, two)


def test_glorot_ignores_the_images(real):
    plain, _ = first_conv(build("configs/fast.yaml", "model.first_conv_init=glorot"))
    given, _ = first_conv(build("configs/fast.yaml", "model.first_conv_init=glorot", train_images=real.x_train[:5_000]))
    np.testing.assert_array_equal(plain, given)


def test_only_a_whitening_run_takes_images_and_only_those_it_reads(real):
    train_idx = np.arange(len(real.x_train))[::-1]
    glorot = config_mod.namespace(config_mod.load("configs/fast.yaml", ["model.first_conv_init=glorot"]))
    assert model_mod.whitening_images(glorot, real.x_train, train_idx) is None
    whiten = config_mod.namespace(config_mod.load("configs/fast.yaml", ["model.first_conv_init=whiten"]))
    images = model_mod.whitening_images(whiten, real.x_train, train_idx)
    assert len(images) == model_mod.WHITEN_IMAGES
    np.testing.assert_array_equal(images, real.x_train[train_idx[:model_mod.WHITEN_IMAGES]])


@pytest.mark.parametrize("layers, shown", [
    ('[{"type": "maxpool", "size": 2}, {"type": "conv", "filters": 8}]', "model.layers[0] is maxpool"),
    ("[]", "model.layers[0] is missing"),
])
def test_whitening_needs_a_convolution_first(layers, shown):
    with pytest.raises(ConfigError) as e:
        config_mod.load(None, [f"model.layers={layers}", "model.first_conv_init=whiten"])
    assert "--set: model.first_conv_init is whiten" in str(e.value) and shown in str(e.value)


def test_a_model_carrying_simulated_ranks_predicts_in_parts_what_the_whole_model_predicts(real):
    """pipeline.predict_logits splits a batch among a SimulatedRanks model's towers (which its inter-op
    threads run side by side): evaluation normalizes with the moving statistics, so each image's
    logits are the plain model's, whatever part of the batch, uneven parts included."""
    from fmnist_dist.training.pipeline import predict_logits

    plain = build("configs/fast.yaml", "model.first_conv_init=glorot")
    ns = config_mod.namespace(config_mod.load("configs/fast.yaml", ["model.first_conv_init=glorot"]))
    towers, _, _ = model_mod.build_and_compile(ns, plan_batches(ns.train, 1, 512, 2), 100)
    assert isinstance(towers, model_mod.SimulatedRanks) and towers.ranks == 2
    towers.set_weights(plain.get_weights())
    for n in (257, 1):                                    # an odd batch, and one with an empty part
        images = tf.constant(real.x_test[:n])
        np.testing.assert_allclose(predict_logits(towers, images), predict_logits(plain, images), rtol=1e-4, atol=1e-4)
    # the control: other weights predict otherwise
    towers.set_weights([w + 0.01 for w in plain.get_weights()])
    images = tf.constant(real.x_test[:257])
    assert not np.allclose(predict_logits(towers, images), predict_logits(plain, images), atol=1e-4)


def test_a_frozen_first_convolution_keeps_its_whitening_while_the_rest_trains(real):
    """model.first_conv_frozen: real steps on real images move every weight but the first
    convolution's; the counts the allreduce and the benchmark use leave its gradient out."""
    sets = ("model.first_conv_frozen=true", "train.lr=0.01")         # as configs/fast.yaml has it, said here
    ns = config_mod.namespace(config_mod.load("configs/fast.yaml", list(sets)))
    model = build("configs/fast.yaml", *sets, train_images=real.x_train[:2000])
    before = [w.copy() for w in model.get_weights()]
    x = real.x_train[:256, :, :, None].astype(np.float32) / 255.0
    y = tf.one_hot(real.y_train[:256].astype(np.int32), 10)
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    after = model.get_weights()
    kernel_and_bias = [i for i, v in enumerate(model.weights) if v.name.startswith(model.layers[0].name + "/")]
    assert len(kernel_and_bias) == 2
    for i, (b, a) in enumerate(zip(before, after)):
        if i in kernel_and_bias:
            np.testing.assert_array_equal(b, a)
        elif "moving" not in model.weights[i].name:
            assert not np.array_equal(b, a), model.weights[i].name
    trainable = sum(v.shape.num_elements() for v in model.trainable_variables)
    assert config_mod.trainable_parameters(ns.model.layers, True) == trainable
    assert config_mod.trainable_parameters(ns.model.layers) == trainable + 3 * 3 * 1 * 16 + 16
    first = model_mod.flops_per_image_of(model.layers[0])
    unfrozen = build("configs/fast.yaml", "model.first_conv_frozen=false")
    assert model_mod.train_flops_per_image(model) == 3 * model_mod.flops_per_image(model) - 2 * first
    assert model_mod.train_flops_per_image(unfrozen) == 3 * model_mod.flops_per_image(unfrozen) - first


def test_the_flop_count_has_no_input_gradient_before_the_first_trained_layer():
    """A network that starts with pooling: neither the pooling's gradient nor the first convolution's
    input gradient is computed; past the convolution every layer passes its input gradient back, and
    the logits layer, the only one there with weights, also gets its weight gradient."""
    ns = config_mod.namespace(config_mod.load(None, [
        'model.layers=[{"type": "maxpool", "size": 2}, {"type": "conv", "filters": 8}, {"type": "flatten"}]']))
    model = model_mod.build_model(ns.model.layers, 0)
    assert model_mod.gradients_computed(model) == [(False, False), (False, True), (True, False), (True, True)]
    conv, logits = model_mod.flops_per_image_of(model.layers[1]), model_mod.flops_per_image_of(model.layers[3])
    assert conv == 2 * 14 * 14 * 8 * 9 and logits == 2 * 14 * 14 * 8 * 10
    assert model_mod.train_flops_by_layer(model) == [0, 2 * conv, 0, 3 * logits]
    assert model_mod.train_flops_per_image(model) == 2 * conv + 3 * logits


def test_only_a_first_convolution_can_be_frozen():
    with pytest.raises(ConfigError) as e:
        config_mod.load(None, ['model.layers=[{"type": "maxpool", "size": 2}, {"type": "conv", "filters": 8}]',
                               "model.first_conv_frozen=true"])
    assert "--set: model.first_conv_frozen is true but model.layers[0] is maxpool" in str(e.value)
