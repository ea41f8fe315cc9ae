"""neumo.imaging: decoding, the seed's preprocessing chain reproduced exactly, mask helpers."""

from __future__ import annotations

import io
import logging

import cv2
import numpy as np
import pytest

from neumo import imaging
from neumo.imaging import ImageError
from neumo.synthetic import make_xray

log = logging.getLogger(__name__)

PIXELS = (128, 256, 512)
CLIPS = (None, 2.0, 20.0)
TOLERANCE = 1e-4
REAL_GLOB = "kermany_full_res/images/train/*/*"


def seed_chain(img: np.ndarray, pixels: int, clip: float | None) -> np.ndarray:
    """The research group's preprocessing, written out as they wrote it (img from cv2.imread)."""
    img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    img = cv2.resize(img, (pixels, pixels))
    img = np.expand_dims(img, axis=-1)
    clahe = cv2.createCLAHE() if clip is None else cv2.createCLAHE(clipLimit=clip)
    img = clahe.apply(img)
    img = (img - np.mean(img)) / np.std(img)
    return img


def _max_diff(img: np.ndarray, pixels: int, clip: float | None) -> float:
    expected = seed_chain(img, pixels, clip)
    got = imaging.prepare(img, pixels, clip)
    assert got.dtype == np.float32
    assert got.shape == (pixels, pixels, 1)
    assert expected.shape in ((pixels, pixels), (pixels, pixels, 1))
    return float(np.max(np.abs(got[..., 0].astype(np.float64) - expected.reshape(pixels, pixels))))


def _encode(image: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def synthetic_files(tmp_path_factory) -> list:
    """Synthetic X-rays on disk (grey JPEG, grey PNG, tinted colour JPEG, non-square), as cv2.imread sees them."""
    folder = tmp_path_factory.mktemp("synthetic_imaging")
    grey, _ = make_xray(3, 300)
    other, _ = make_xray(4, 256, pneumonia=True)
    wide = cv2.resize(other, (420, 330))
    colour = cv2.merge([wide, cv2.add(wide, 7), cv2.subtract(wide, 11)])  # BGR, R != G != B
    files = []
    for name, image in (("grey.jpeg", grey), ("grey.png", other), ("colour.jpeg", colour)):
        path = folder / name
        path.write_bytes(_encode(image, "." + name.rsplit(".", 1)[1]))
        files.append(path)
    return files


@pytest.fixture(scope="module")
def real_sample(shared_data) -> list:
    """~10 real full-resolution Kermany files (every 20th, sorted), decoded once."""
    files = sorted(shared_data.glob(REAL_GLOB))
    if not files:
        pytest.skip(f"no real images under {shared_data / REAL_GLOB}")
    return [(path, cv2.imread(str(path))) for path in files[::20]]


# --------------------------------------------------------------------------- seed equivalence


@pytest.mark.parametrize("pixels", PIXELS)
@pytest.mark.parametrize("clip", CLIPS)
def test_prepare_matches_seed_on_synthetic(synthetic_files, pixels, clip):
    for path in synthetic_files:
        img = cv2.imread(str(path))
        assert _max_diff(img, pixels, clip) < TOLERANCE, path.name
        # the pipeline's own decode gives the same grey image, hence the same result
        grey = imaging.read_grey(path.read_bytes())
        assert np.array_equal(imaging.prepare_uint8(grey, pixels, clip),
                              imaging.prepare_uint8(img, pixels, clip))


def test_prepare_accepts_grey_bgra_and_channel_axis(synthetic_files):
    img = cv2.imread(str(synthetic_files[2]))
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    bgra = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = 17  # alpha must not matter
    ref = imaging.prepare(img, 128)
    for variant in (grey, grey[..., None], bgra):
        assert np.array_equal(imaging.prepare(variant, 128), ref)


@pytest.mark.parametrize("pixels", PIXELS)
@pytest.mark.parametrize("clip", CLIPS)
def test_prepare_matches_seed_on_real_sample(real_sample, pixels, clip):
    worst = max(_max_diff(img, pixels, clip) for _, img in real_sample)
    log.info("real sample, %d px, clip %s: max abs diff %.3g", pixels, clip, worst)
    assert worst < TOLERANCE


def test_read_grey_equals_imread_on_real_sample(real_sample):
    for path, img in real_sample:
        assert np.array_equal(imaging.read_grey(path.read_bytes()),
                              cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)), path.name


@pytest.mark.slow
def test_prepare_matches_seed_on_every_real_file(shared_data):
    files = sorted(shared_data.glob(REAL_GLOB))
    if not files:
        pytest.skip(f"no real images under {shared_data / REAL_GLOB}")
    worst = 0.0
    for path in files:
        data = path.read_bytes()
        img = cv2.imread(str(path))
        assert np.array_equal(imaging.read_grey(data), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
        for pixels in PIXELS:
            for clip in CLIPS:
                diff = _max_diff(img, pixels, clip)
                assert diff < TOLERANCE, (path.name, pixels, clip, diff)
                worst = max(worst, diff)
    log.info("all %d real files: max abs diff %.3g", len(files), worst)


# --------------------------------------------------------------------------- z-score


def test_zscore_of_prepare_uint8_is_prepare(synthetic_files):
    img = cv2.imread(str(synthetic_files[0]))
    for clip in CLIPS:
        stored = imaging.prepare_uint8(img, 128, clip)
        assert stored.dtype == np.uint8 and stored.shape == (128, 128)
        assert np.array_equal(imaging.zscore(stored), imaging.prepare(img, 128, clip))


def test_zscore_batch_constant_and_channel_axis():
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, size=(4, 32, 32), dtype=np.uint8)
    batch[2] = 77  # constant image
    out = imaging.zscore(batch)
    assert out.shape == (4, 32, 32, 1) and out.dtype == np.float32
    for i in range(4):
        assert np.array_equal(out[i], imaging.zscore(batch[i]))
    assert np.all(out[2] == 0.0)
    assert np.isclose(out[0].mean(), 0.0, atol=1e-5) and np.isclose(out[0].std(), 1.0, atol=1e-5)
    assert np.array_equal(imaging.zscore(batch[0][..., None]), out[0])
    assert np.array_equal(imaging.zscore(batch[..., None]), out)
    with pytest.raises(ValueError):
        imaging.zscore(np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError):
        imaging.zscore(np.zeros((0, 4), np.uint8))


def test_zscore_tf_matches_numpy_eagerly_and_in_tf_data():
    tf = pytest.importorskip("tensorflow")
    batch = np.stack([imaging.prepare_uint8(make_xray(i, 96)[0], 64) for i in range(3)])
    batch = np.concatenate([batch, np.full((1, 64, 64), 9, np.uint8)])
    expected = imaging.zscore(batch)
    got = imaging.zscore_tf(tf.constant(batch)).numpy()
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.max(np.abs(got - expected)) < 1e-5
    single = imaging.zscore_tf(batch[0]).numpy()
    assert single.shape == (64, 64, 1) and np.max(np.abs(single - expected[0])) < 1e-5
    assert np.max(np.abs(imaging.zscore_tf(batch[..., None]).numpy() - expected)) < 1e-5
    floats = imaging.zscore_tf(tf.constant(batch, tf.float32)).numpy()
    assert np.max(np.abs(floats - expected)) < 1e-5

    ds = tf.data.Dataset.from_tensor_slices(batch).map(imaging.zscore_tf)
    mapped = np.stack([x.numpy() for x in ds])
    assert np.max(np.abs(mapped - expected)) < 1e-5
    batched = tf.data.Dataset.from_tensor_slices(batch).batch(2).map(imaging.zscore_tf)
    assert np.max(np.abs(np.concatenate([x.numpy() for x in batched]) - expected)) < 1e-5
    assert np.all(mapped[3] == 0.0)


# --------------------------------------------------------------------------- decode


def test_decode_grey_png_and_rgb_jpeg(tmp_path):
    grey, _ = make_xray(5, 64)
    out = imaging.decode(_encode(grey, ".png"))
    assert out.dtype == np.uint8 and out.shape == (64, 64) and np.array_equal(out, grey)

    colour = cv2.merge([grey, cv2.add(grey, 30), cv2.subtract(grey, 30)])
    path = tmp_path / "c.jpeg"
    path.write_bytes(_encode(colour, ".jpeg", cv2.IMWRITE_JPEG_QUALITY, 95))
    out = imaging.decode(path.read_bytes())
    assert out.shape == (64, 64, 3) and np.array_equal(out, cv2.imread(str(path)))
    assert np.array_equal(imaging.read_grey(path.read_bytes()),
                          cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY))
    assert np.array_equal(imaging.decode(bytearray(path.read_bytes())), out)


def test_decode_16bit_png_scaled():
    values = np.array([[0, 1, 128, 129, 257, 385], [386, 32767, 65278, 65279, 65534, 65535]],
                      dtype=np.uint16)
    out = imaging.decode(_encode(values, ".png"))
    assert out.dtype == np.uint8 and out.shape == values.shape
    assert np.array_equal(out, np.rint(values / 257.0).astype(np.uint8))
    assert out[0, 0] == 0 and out[1, -1] == 255 and out[0, 4] == 1
    colour = np.stack([values, values // 2, values // 3], axis=-1)
    out = imaging.decode(_encode(colour, ".png"))
    assert out.shape == (2, 6, 3) and np.array_equal(out, np.rint(colour / 257.0).astype(np.uint8))


def test_decode_rgba_png():
    rng = np.random.default_rng(3)
    bgra = rng.integers(0, 256, size=(20, 30, 4), dtype=np.uint8)
    out = imaging.decode(_encode(bgra, ".png"))
    assert out.shape == (20, 30, 4) and np.array_equal(out, bgra)
    assert np.array_equal(imaging.to_grey(out), cv2.cvtColor(bgra[..., :3], cv2.COLOR_BGR2GRAY))


def test_decode_palette_grey_alpha_and_exif_with_pil(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    palette = pil.fromarray(rgb).convert("P", palette=pil.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    out = imaging.decode(buf.getvalue())
    assert out.shape == (20, 30, 3)
    assert np.array_equal(out[..., ::-1], np.asarray(palette.convert("RGB")))

    la = rng.integers(0, 256, size=(20, 30, 2), dtype=np.uint8)
    buf = io.BytesIO()
    pil.fromarray(la, "LA").save(buf, "PNG")
    assert np.array_equal(imaging.read_grey(buf.getvalue()), la[..., 0])

    # EXIF orientation: decode sees the image as cv2.imread does (rotated)
    exif = pil.Exif()
    exif[274] = 6
    path = tmp_path / "rotated.jpeg"
    pil.fromarray(rgb[..., 0]).save(path, "JPEG", exif=exif, quality=95)
    imread = cv2.imread(str(path))
    assert imread.shape[:2] == (30, 20)
    assert np.array_equal(imaging.read_grey(path.read_bytes()),
                          cv2.cvtColor(imread, cv2.COLOR_BGR2GRAY))


@pytest.mark.parametrize("data", [b"", b"hello, this is not an image\n", b"\x89PNG\r\n\x1a\n"],
                         ids=["empty", "text", "png-signature-only"])
def test_decode_rejects_non_images(data):
    with pytest.raises(ImageError):
        imaging.decode(data)


@pytest.mark.parametrize("ext", [".jpeg", ".png"])
def test_decode_rejects_truncated(ext):
    data = _encode(make_xray(6, 128)[0], ext)
    with pytest.raises(ImageError, match="undecodable|could not decode"):
        imaging.decode(data[: len(data) // 2])


def test_decode_and_to_grey_reject_wrong_types():
    with pytest.raises(TypeError):
        imaging.decode("not bytes")
    with pytest.raises(ImageError):
        imaging.to_grey(np.zeros((4, 4), np.float32))
    with pytest.raises(ImageError):
        imaging.to_grey(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ImageError):
        imaging.to_grey(np.zeros((0, 4), np.uint8))
    with pytest.raises(ImageError):
        imaging.to_grey(np.zeros((2, 4, 4, 3), np.uint8))
    assert issubclass(ImageError, ValueError)


def test_to_grey_variants():
    rng = np.random.default_rng(5)
    bgr = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert np.array_equal(imaging.to_grey(bgr), grey)
    assert np.array_equal(imaging.to_grey(bgr[:, ::-1]), grey[:, ::-1])  # non-contiguous view
    assert np.array_equal(imaging.to_grey(grey[..., None]), grey)
    assert imaging.to_grey(grey) is grey


# --------------------------------------------------------------------------- ill inputs


@pytest.mark.parametrize("pixels", [0, -1, "a", 1.5, True, None])
def test_bad_pixels_raise(pixels):
    image = np.zeros((8, 8), np.uint8)
    for func in (imaging.prepare, imaging.prepare_uint8, imaging.mask_input):
        with pytest.raises(ValueError, match="pixels"):
            func(image, pixels)


@pytest.mark.parametrize("clip", [7, 40.0, 0, "2.0", True, -2.0])
def test_unknown_clip_raises(clip):
    with pytest.raises(ValueError, match=r"None, 2\.0, 20\.0"):
        imaging.clahe_limit(clip)
    with pytest.raises(ValueError):
        imaging.prepare(np.zeros((8, 8), np.uint8), 8, clip)


def test_clahe_limit_values():
    assert imaging.CLAHE_CLIPS == (None, 2.0, 20.0)
    assert imaging.clahe_limit(None) == 40.0
    assert imaging.clahe_limit(2.0) == 2.0 and imaging.clahe_limit(2) == 2.0
    assert imaging.clahe_limit(20.0) == 20.0
    assert isinstance(imaging.clahe_limit(20), float)


def test_numpy_integer_pixels_accepted():
    out = imaging.prepare(np.full((8, 8), 3, np.uint8), np.int64(16))
    assert out.shape == (16, 16, 1) and np.all(out == 0.0)  # constant image: zeros, no NaN


# --------------------------------------------------------------------------- masks


def _lungs_prob(h: int = 64, w: int = 64) -> np.ndarray:
    """Two lung ellipses (one with a hole), a small third blob and specks, as probabilities."""
    prob = np.zeros((h, w), np.float32)
    cv2.ellipse(prob, (18, 32), (10, 22), 0, 0, 360, 0.9, -1)
    cv2.ellipse(prob, (46, 32), (10, 22), 0, 0, 360, 0.8, -1)
    cv2.circle(prob, (18, 30), 4, 0.1, -1)        # hole inside the right lung
    cv2.circle(prob, (32, 5), 2, 0.95, -1)        # extra blob, smaller than the lungs
    prob[60, 2] = prob[1, 62] = 1.0               # specks
    prob[20, 32] = 0.49                           # below threshold
    return prob


def test_postprocess_mask_fills_holes_keeps_two_lungs():
    prob = _lungs_prob()
    shape = (200, 150)
    mask = imaging.postprocess_mask(prob, shape)
    assert mask.dtype == np.bool_ and mask.shape == shape
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    assert count - 1 == 2
    hole = (int(30 * 200 / 64), int(18 * 150 / 64))  # hole centre in the output
    assert mask[hole]
    assert not mask[int(5 * 200 / 64), int(32 * 150 / 64)]  # extra blob removed
    assert not mask[-3:, :8].any() and not mask[:4, -8:].any()  # specks removed
    assert np.array_equal(imaging.postprocess_mask(prob[..., None], shape), mask)
    qa = imaging.mask_qa(mask)
    assert qa["components"] == 2 and qa["flags"] == []
    assert 0.05 < qa["lung_fraction"] < 0.7


def test_postprocess_mask_same_size_threshold_and_few_components():
    prob = np.zeros((40, 40), np.float32)
    prob[5:35, 5:15] = 0.7
    assert imaging.postprocess_mask(prob, (40, 40)).sum() == 300
    assert not imaging.postprocess_mask(prob, (40, 40), threshold=0.8).any()
    assert not imaging.postprocess_mask(np.zeros((8, 8)), (16, 16)).any()


def test_the_scikit_image_clean_up_equals_scipy_and_opencv_on_random_masks():
    """fill_holes and the component labelling (scikit-image) against two independent tools: SciPy's
    binary_fill_holes and OpenCV's 8-connected components, on random blobs with holes and specks."""
    import cv2
    from scipy import ndimage

    rng = np.random.default_rng(3)
    for i in range(40):
        noise = cv2.GaussianBlur(rng.random((90, 70)).astype(np.float32), (0, 0), 2 + i % 4)
        mask = noise > np.quantile(noise, 0.3 + 0.4 * rng.random())
        assert np.array_equal(imaging.fill_holes(mask), ndimage.binary_fill_holes(mask)), i
        count, labels, areas = imaging._components(mask)
        n, cv_labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        assert count == n - 1 and sorted(areas) == sorted(stats[1:, cv2.CC_STAT_AREA]), i
        assert np.array_equal(labels > 0, cv_labels > 0)


@pytest.mark.parametrize("shape", [(0, 10), (10,), "ab", (10.5, 3), None])
def test_postprocess_mask_rejects_bad_shape(shape):
    with pytest.raises(ValueError):
        imaging.postprocess_mask(np.zeros((8, 8)), shape)


def test_postprocess_mask_rejects_bad_prob():
    with pytest.raises(ValueError):
        imaging.postprocess_mask(np.zeros((8, 8, 2)), (8, 8))
    with pytest.raises(ValueError):
        imaging.postprocess_mask(np.zeros((8, 8)), (8, 8), threshold=float("nan"))


def test_apply_mask_zero_outside_unchanged_inside():
    grey, lung = make_xray(7, 64)
    mask = lung > 0
    out = imaging.apply_mask(grey, mask)
    assert out.dtype == np.uint8 and out.shape == grey.shape
    assert np.all(out[~mask] == 0) and np.array_equal(out[mask], grey[mask])
    seed_formula = np.rint((grey / 255.0 * mask) * 255.0).astype(np.uint8)  # the seed's arithmetic
    assert np.array_equal(out, seed_formula)
    assert np.array_equal(imaging.apply_mask(grey, lung), out)  # {0,255} masks work too
    with pytest.raises(ValueError):
        imaging.apply_mask(grey, mask[:-1])
    with pytest.raises(ValueError):
        imaging.apply_mask(grey.astype(np.float32), mask)


def test_mask_qa_flags():
    empty = imaging.mask_qa(np.zeros((50, 50), bool))
    assert empty["lung_fraction"] == 0.0 and empty["components"] == 0
    assert "empty" in empty["flags"]
    one = np.zeros((50, 50), np.uint8)
    one[10:40, 10:40] = 255
    qa = imaging.mask_qa(one)
    assert qa["components"] == 1 and qa["flags"] == ["components"]
    assert qa["lung_fraction"] == pytest.approx(900 / 2500)
    full = imaging.mask_qa(np.ones((50, 50), bool))
    assert "implausible_area" in full["flags"] and "empty" not in full["flags"]
    tiny = np.zeros((100, 100), bool)
    tiny[10:15, 10:15] = tiny[10:15, 80:85] = True
    assert imaging.mask_qa(tiny)["flags"] == ["implausible_area"]
    assert isinstance(qa["lung_fraction"], float) and isinstance(qa["components"], int)


def test_mask_input_contract():
    grey, _ = make_xray(8, 300)
    x = imaging.mask_input(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
    assert x.shape == (256, 256, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.allclose(x[..., 0], cv2.resize(grey, (256, 256)) / 255.0, atol=1e-7)
    assert imaging.mask_input(grey, 64).shape == (64, 64, 1)
