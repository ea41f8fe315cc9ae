"""Keras 3 functional models built from small named blocks.

One U-Net builder serves the autoencoder (pretraining) and the lung-mask model; one classifier
builder wraps the pretrained encoder (the backbone) with head 1 (squeeze-and-excitation on three
encoder taps) or head 2 (the three taps global-max-pooled). Layers are named hierarchically
(`enc2_conv1`, `tap1_se_excite`) so taps are found by name, never by index.
"""

from __future__ import annotations

import logging

import keras
from keras import layers

from neumo import parameters

logger = logging.getLogger(__name__)


def tap_names(depth: int) -> tuple[str, str, str]:
    """The three encoder layers a classifier reads, deepest last.

    The two deepest encoder blocks and the bottleneck: the seed's "layers 11 and 15" plus the
    backbone output, named instead of counted.
    """
    if depth < 2:
        raise ValueError(f"depth must be >= 2 to have three encoder taps, got {depth}")
    return (f"enc{depth - 1}_conv2", f"enc{depth}_conv2", "bottleneck_conv2")


def check_pixels(pixels: int, depth: int) -> None:
    """Raise ValueError unless `pixels` is a positive multiple of the U-Net's 2**depth."""
    factor = 2**depth
    if not isinstance(pixels, int) or pixels <= 0 or pixels % factor:
        raise ValueError(f"pixels must be a positive multiple of 2**depth={factor}, got {pixels!r}")


def conv_block(x, filters: int, name: str, synchronized: bool = False):
    """Two 3x3 convolutions, each followed by batch normalisation and ReLU. `synchronized`: the
    batch statistics are those of the global batch, across replicas (training under tf.distribute)."""
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}_raw")(x)
        x = layers.BatchNormalization(momentum=0.9, synchronized=synchronized, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_conv{i}")(x)
    return x


def down_block(x, filters: int, name: str, synchronized: bool = False):
    """conv_block, then 2x2 max-pool; returns (pooled, features before pooling)."""
    features = conv_block(x, filters, name, synchronized)
    return layers.MaxPooling2D(2, name=f"{name}_pool")(features), features


def up_block(x, skip, filters: int, name: str, synchronized: bool = False):
    """2x transposed-conv upsampling, concatenation with the skip (if any), conv_block."""
    x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_up")(x)
    if skip is not None:
        x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    return conv_block(x, filters, name, synchronized)


def build_unet(
    pixels: int,
    depth: int = 4,
    filters: int = 16,
    output: str = "linear",
    skip_levels: int = 0,
    name: str = "unet",
    synchronized: bool = False,
) -> keras.Model:
    """U-Net on (pixels, pixels, 1) inputs.

    `output` is "linear" for the autoencoder (z-scored image out) or "sigmoid" for a mask.
    `skip_levels` drops the skip connections of the shallowest levels (1 = the top one), so a
    pretraining task cannot copy the image through them and leave the deep encoder untrained.
    Encoder blocks are `enc1` .. `enc{depth}` (filters doubling), then `bottleneck`.
    `synchronized`: batch normalisation over the global batch of a tf.distribute strategy (False:
    the plain model; the layer configurations differ only in this flag).
    """
    check_pixels(pixels, depth)
    if output not in ("linear", "sigmoid"):
        raise ValueError(f"output must be 'linear' or 'sigmoid', got {output!r}")
    if not 0 <= skip_levels <= depth:
        raise ValueError(f"skip_levels must be in 0..{depth}, got {skip_levels}")
    inputs = keras.Input((pixels, pixels, 1), name="image")
    x, skips = inputs, []
    for level in range(1, depth + 1):
        x, features = down_block(x, filters * 2 ** (level - 1), f"enc{level}", synchronized)
        skips.append(features)
    x = conv_block(x, filters * 2**depth, "bottleneck", synchronized)
    for level in range(depth, 0, -1):
        skip = skips[level - 1] if level > skip_levels else None
        x = up_block(x, skip, filters * 2 ** (level - 1), f"dec{level}", synchronized)
    outputs = layers.Conv2D(1, 1, activation=output, name="output", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def unet_depth(model: keras.Model) -> int:
    """The depth of a U-Net built by build_unet, read from its layer names."""
    return sum(1 for layer in model.layers if layer.name.endswith("_pool") and layer.name.startswith("enc"))


def rebuild(model: keras.Model, recast: bool = False, synchronized: bool | None = None) -> keras.Model:
    """A copy of a (loaded) model with the same weights, its layers (nested models' too) rebuilt:
    `recast` drops each layer's stored dtype so it follows the current global dtype policy (a saved
    model keeps the float32 policy it was saved with); `synchronized` (when not None) sets whether its
    batch normalisations are synchronized across the replicas of a tf.distribute strategy (build a
    synchronized copy in the strategy's scope)."""
    def clone(layer):
        config = layer.get_config()
        if recast:
            config.pop("dtype", None)
        if synchronized is not None and isinstance(layer, layers.BatchNormalization):
            config["synchronized"] = synchronized
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def build_backbone(unet: keras.Model) -> keras.Model:
    """The U-Net's encoder as a model with the three tap outputs (shallowest first)."""
    names = tap_names(unet_depth(unet))
    try:
        outputs = [unet.get_layer(n).output for n in names]
    except ValueError as err:
        raise ValueError(f"the pretrained model has no encoder layers named {names}: {err}") from err
    return keras.Model(unet.input, outputs, name="backbone")


FROZEN_COUNTS = parameters.BY_NAME["frozen_layers_count"].choices  # what frozen_layers may count


def freeze(backbone: keras.Model, frozen_layers: int, count: str = "weighted") -> int:
    """Freeze the first `frozen_layers` layers of the backbone; returns how many can be counted.

    count "weighted": layers with weights (each convolution and each batch norm counts one);
    "keras": `backbone.layers[:frozen_layers]` as the seed's Keras code would (the input,
    activations and poolings count too). README: The backbone has the table of both counts."""
    if count not in FROZEN_COUNTS:
        raise ValueError(f"frozen_layers_count must be one of {FROZEN_COUNTS}, got {count!r}")
    counted = [layer for layer in backbone.layers if layer.weights] if count == "weighted" else list(backbone.layers)
    if not 0 <= frozen_layers <= len(counted):
        raise ValueError(f"frozen_layers must be in 0..{len(counted)} for this backbone ({count} layers), "
                         f"got {frozen_layers}")
    for i, layer in enumerate(counted):
        layer.trainable = i >= frozen_layers
    return len(counted)


def backbone_table(depth: int = 4, filters: int = 16, pixels: int = 256) -> list[dict]:
    """The backbone's layers in order: Keras index, weighted-layer index (blank for a layer without
    weights), name, kind, output shape and which tap it is: what `frozen_layers` counts."""
    backbone = build_backbone(build_unet(pixels, depth, filters))
    taps = {name: f"tap {i}" for i, name in enumerate(tap_names(depth), 1)}
    rows, weighted = [], 0
    for index, layer in enumerate(backbone.layers):
        shape = layer.output.shape if hasattr(layer, "output") else ()
        rows.append({"keras": index, "weighted": weighted if layer.weights else "", "name": layer.name,
                     "kind": type(layer).__name__, "output": "x".join(str(d) for d in shape[1:]),
                     "tap": taps.get(layer.name, "")})
        weighted += bool(layer.weights)
    return rows


def se_block(x, ratio: int, name: str):
    """Squeeze-and-excitation channel attention: scale each channel by a learnt gate."""
    channels = x.shape[-1]
    s = layers.GlobalAveragePooling2D(name=f"{name}_squeeze")(x)
    s = layers.Dense(max(channels // ratio, 4), activation="relu", name=f"{name}_reduce")(s)
    s = layers.Dense(channels, activation="sigmoid", name=f"{name}_excite")(s)
    s = layers.Reshape((1, 1, channels), name=f"{name}_gate")(s)
    return layers.Multiply(name=f"{name}_scale")([x, s])


def attention_head(x, filters: int, name: str):
    """Head 1 on one tap: conv -> squeeze-and-excitation -> max-pool -> global max-pool -> dense 128."""
    x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"{name}_conv")(x)
    x = se_block(x, ratio=8, name=f"{name}_se")
    x = layers.MaxPooling2D(2, padding="same", name=f"{name}_pool")(x)
    x = layers.GlobalMaxPooling2D(name=f"{name}_gmp")(x)
    return layers.Dense(128, activation="relu", name=f"{name}_dense")(x)


def build_head(tap_shapes, model: int = 1, dropout: float = 0.3) -> keras.Model:
    """The task head on the three tap feature maps; sigmoid probability out.

    model 1: attention_head on each tap, concatenated, dense 64, dropout, dense 1.
    model 2: each tap global-max-pooled, concatenated, dropout, dense 1 (no attention).
    """
    if model not in (1, 2):
        raise ValueError(f"model must be 1 or 2, got {model!r}")
    taps = [keras.Input(tuple(shape[1:]), name=f"tap{i}") for i, shape in enumerate(tap_shapes, 1)]
    if model == 1:
        feats = [attention_head(t, t.shape[-1], f"tap{i}") for i, t in enumerate(taps, 1)]
    else:
        feats = [layers.GlobalMaxPooling2D(name=f"tap{i}_gmp")(t) for i, t in enumerate(taps, 1)]
    x = layers.Concatenate(name="taps_concat")(feats)
    if model == 1:
        x = layers.Dense(64, activation="relu", name="head_dense")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    out = layers.Dense(1, activation="sigmoid", name="pneumonia", dtype="float32")(x)
    return keras.Model(taps, out, name="head")


def build_classifier(backbone: keras.Model, model: int = 1, dropout: float = 0.3) -> keras.Model:
    """Pneumonia classifier: the backbone (pretrained encoder, three taps) wrapped by head 1 or 2.

    Both are nested models named "backbone" and "head", so the tap feature maps stay reachable
    (Grad-CAM reads the deepest one).
    """
    head = build_head([t.shape for t in backbone.outputs], model, dropout)
    image = keras.Input(backbone.input.shape[1:], name="image")
    return keras.Model(image, head(backbone(image)), name=f"classifier{model}")


def grad_cam(classifier: keras.Model, images, tap: int = 2):
    """Grad-CAM heatmaps (N, p, p) in 0..1 for z-scored images (N, p, p, 1): where the encoder's
    `tap` feature map (0-based, of the three) drives the pneumonia probability up."""
    import tensorflow as tf

    backbone, head = classifier.get_layer("backbone"), classifier.get_layer("head")
    x = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        taps = backbone(x, training=False)
        tape.watch(taps[tap])
        prob = head(taps, training=False)
    grads = tape.gradient(prob, taps[tap])
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * taps[tap], axis=-1))
    cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-8)
    return tf.image.resize(cam[..., None], x.shape[1:3])[..., 0].numpy()
