"""Model builders: shapes, named taps, freezing, and that a few steps learn."""

import keras
import numpy as np
import pytest

from neumo import models


@pytest.mark.parametrize("pixels,depth,filters", [(64, 3, 4), (128, 4, 4), (32, 2, 8)])
def test_unet_shapes_and_named_encoder(pixels, depth, filters):
    unet = models.build_unet(pixels, depth, filters)
    assert unet.output_shape == (None, pixels, pixels, 1)
    for level in range(1, depth + 1):
        layer = unet.get_layer(f"enc{level}_conv2")
        assert layer.output.shape[-1] == filters * 2 ** (level - 1)
        assert layer.output.shape[1] == pixels // 2 ** (level - 1)
    assert unet.get_layer("bottleneck_conv2").output.shape[1] == pixels // 2**depth
    assert models.unet_depth(unet) == depth


def test_skip_levels_drop_the_shallow_skips():
    full = models.build_unet(64, 3, 4)
    dropped = models.build_unet(64, 3, 4, skip_levels=1)
    assert "dec1_concat" in [layer.name for layer in full.layers]
    assert "dec1_concat" not in [layer.name for layer in dropped.layers]
    assert "dec2_concat" in [layer.name for layer in dropped.layers]


@pytest.mark.parametrize("kwargs,match", [
    ({"pixels": 100, "depth": 4}, "multiple"),
    ({"pixels": 0, "depth": 2}, "multiple"),
    ({"pixels": 64, "depth": 2, "output": "softmax"}, "output"),
    ({"pixels": 64, "depth": 2, "skip_levels": 3}, "skip_levels"),
])
def test_unet_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.build_unet(**kwargs)


@pytest.mark.parametrize("head", [1, 2])
def test_classifier_taps_found_by_name(head):
    unet = models.build_unet(64, 3, 4)
    backbone = models.build_backbone(unet)
    names = models.tap_names(3)
    assert names == ("enc2_conv2", "enc3_conv2", "bottleneck_conv2")
    assert [t.shape[1] for t in backbone.outputs] == [32, 16, 8]
    clf = models.build_classifier(backbone, head)
    assert clf.output_shape == (None, 1)
    out = clf.predict(np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype("float32"), verbose=0)
    assert out.shape == (2, 1) and np.all((out > 0) & (out < 1))
    layer_names = {layer.name for layer in clf.get_layer("head").layers}
    if head == 1:
        assert {"tap1_se_scale", "tap2_se_scale", "tap3_se_scale", "tap3_dense"} <= layer_names
    else:
        assert {"tap1_gmp", "tap2_gmp", "tap3_gmp"} <= layer_names and "tap1_se_scale" not in layer_names


def test_backbone_refuses_a_model_without_encoder_names():
    inputs = keras.Input((16, 16, 1))
    plain = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same", name="enc1_pool")(inputs))
    with pytest.raises(ValueError):
        models.build_backbone(plain)


def test_freeze_counts_weighted_layers():
    backbone = models.build_backbone(models.build_unet(64, 3, 4))
    total = models.freeze(backbone, 4)
    weighted = [layer for layer in backbone.layers if layer.weights]
    assert total == len(weighted)
    assert [layer.trainable for layer in weighted[:5]] == [False] * 4 + [True]
    with pytest.raises(ValueError, match="frozen_layers"):
        models.freeze(backbone, total + 1)


def test_freeze_by_keras_index_as_the_seed_counted():
    """count="keras": backbone.layers[:n], the input, activations and poolings included."""
    backbone = models.build_backbone(models.build_unet(64, 3, 4))
    total = models.freeze(backbone, 8, "keras")
    assert total == len(backbone.layers)
    assert [layer.trainable for layer in backbone.layers[:9]] == [False] * 8 + [True]
    assert backbone.layers[7].name == "enc1_pool" and backbone.layers[8].name == "enc2_conv1_raw"
    with pytest.raises(ValueError, match=r"frozen_layers must be in 0\.\.\d+ for this backbone \(keras layers\)"):
        models.freeze(backbone, total + 1, "keras")
    with pytest.raises(ValueError, match="frozen_layers_count must be one of"):
        models.freeze(backbone, 1, "layers")


def test_the_backbone_table_in_the_readme_is_the_code_s():
    """README: The backbone lists every layer with both counts; it is generated from the code."""
    from tests.conftest import REPO_ROOT

    rows = models.backbone_table()
    assert [r["tap"] for r in rows if r["tap"]] == ["tap 1", "tap 2", "tap 3"]
    assert rows[0]["weighted"] == "" and rows[1]["weighted"] == 0 and rows[-1]["name"] == "bottleneck_conv2"
    readme = (REPO_ROOT / "README.md").read_text()
    for r in rows:
        line = f"| {r['keras']} | {r['weighted']} | `{r['name']}` | {r['kind']} | {r['output']} | {r['tap']} |"
        assert line in readme, line


def test_a_few_training_steps_reduce_the_loss():
    """On synthetic X-rays, 30 steps of classifier training lower the training loss."""
    from neumo import imaging, synthetic

    keras.utils.set_random_seed(0)
    pairs = [synthetic.make_xray(i, 64, pneumonia=bool(i % 2)) for i in range(16)]
    x = imaging.zscore(np.stack([p[0] for p in pairs]))
    y = np.array([i % 2 for i in range(16)], "float32")[:, None]
    clf = models.build_classifier(models.build_backbone(models.build_unet(64, 3, 4)), 1)
    clf.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    losses = clf.fit(x, y, batch_size=8, epochs=15, verbose=0).history["loss"]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_grad_cam_maps_have_the_image_shape():
    clf = models.build_classifier(models.build_backbone(models.build_unet(64, 3, 4)), 1)
    x = np.random.default_rng(0).normal(size=(3, 64, 64, 1)).astype("float32")
    cam = models.grad_cam(clf, x)
    assert cam.shape == (3, 64, 64) and cam.min() >= 0 and cam.max() <= 1 + 1e-6


def test_classifier_survives_a_save_and_safe_load(tmp_path):
    clf = models.build_classifier(models.build_backbone(models.build_unet(64, 3, 4)), 2)
    clf.save(tmp_path / "c.keras")
    again = keras.saving.load_model(tmp_path / "c.keras", safe_mode=True, compile=False)
    x = np.ones((1, 64, 64, 1), "float32")
    np.testing.assert_allclose(again.predict(x, verbose=0), clf.predict(x, verbose=0), atol=1e-6)
    assert models.grad_cam(again, x).shape == (1, 64, 64)
