"""The out-of-distribution check (neumo.ood) on a tiny classifier: it flags images that are no chest
X-ray (noise, a flat frame, a photograph, 1/f clouds) and few held-out chest X-rays, its reference
is JSON and stays numerically safe with fewer images than features; ill inputs raise."""

import json

import numpy as np
import pytest

from neumo import imaging, models, ood, synthetic

PIXELS = 64


@pytest.fixture(scope="module")
def classifier():
    """A tiny classifier (U-Net encoder, filters 4, depth 3: 8 + 16 + 32 = 56 pooled features);
    untrained: the check must work with whatever features the backbone gives."""
    import keras

    keras.utils.set_random_seed(0)
    return models.build_classifier(models.build_backbone(models.build_unet(PIXELS, depth=3, filters=4)), model=2)


def _xrays(seeds) -> np.ndarray:
    """Synthetic chest X-rays through the seed's chain, as preprocess stores them (uint8, CLAHE)."""
    return np.stack([imaging.prepare_uint8(synthetic.make_xray(s, size=128, pneumonia=bool(s % 2))[0], PIXELS)
                     for s in seeds])


def _clouds(seed: int, size: int = 128) -> np.ndarray:
    """A natural-looking synthetic picture: 1/f noise (the spectrum of natural scenes)."""
    rng = np.random.default_rng(seed)
    f2 = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2
    field = np.real(np.fft.ifft2(np.exp(2j * np.pi * rng.random((size, size)))) / np.maximum(f2, 1 / size**2) ** 0.5)
    return ((field - field.min()) / np.ptp(field) * 255).astype(np.uint8)


def _non_chest() -> dict[str, np.ndarray]:
    from skimage import data as samples

    rng = np.random.default_rng(1)
    raw = {"uniform noise": rng.integers(0, 256, (128, 128), dtype=np.uint8),
           "flat grey": np.full((128, 128), 128, np.uint8),
           "photograph (camera)": samples.camera(),
           "1/f clouds": _clouds(2)}
    return {name: imaging.prepare_uint8(image, PIXELS) for name, image in raw.items()}


@pytest.fixture(scope="module")
def reference(classifier):
    return ood.fit(classifier, _xrays(range(48)), fitted_on="48 synthetic X-rays")


def test_reference_is_json_and_holds_its_false_alarm_rate(reference):
    back = json.loads(json.dumps(reference))
    assert back["method"] == ood.METHOD and back["fitted_on"] == "48 synthetic X-rays"
    assert back["n_fit"] == 48 < back["features"] == 56  # fewer images than features
    assert np.isfinite(back["threshold"]) and back["threshold"] > 0
    assert back["false_alarm_target"] == 0.05
    assert back["false_alarm_rate"] <= 0.05 + 1 / 48
    assert np.isfinite(np.asarray(back["precision"])).all()


def test_threshold_comes_from_out_of_fold_scores_grouped_by_patient(classifier):
    images = _xrays(range(20))
    patients = [f"person{i // 2}" for i in range(20)]  # two images per patient, kept in one fold
    ref = ood.fit(classifier, images, groups=patients)
    assert ref["threshold_from"] == "5-fold out-of-fold scores (folds by group)"
    in_sample = ood.score(classifier, images, ref)
    assert ref["threshold"] > np.quantile(in_sample, 0.95)  # a new image lies farther than a fitted one
    with pytest.raises(ValueError, match="one group per image"):
        ood.fit(classifier, images, groups=patients[:5])


def test_json_round_trip_gives_the_same_scores(classifier, reference):
    images = _xrays(range(100, 104))
    np.testing.assert_allclose(ood.score(classifier, images, json.loads(json.dumps(reference))),
                               ood.score(classifier, images, reference))


def test_non_chest_images_are_flagged(classifier, reference):
    images = _non_chest()
    scores = ood.score(classifier, np.stack(list(images.values())), reference)
    flagged = ood.flags(scores, reference)
    assert flagged.all(), {name: round(float(s), 1) for name, s in zip(images, scores)}


def test_held_out_chest_images_are_mostly_not_flagged(classifier, reference):
    held_out = _xrays(range(1000, 1032))
    flagged = ood.flags(ood.score(classifier, held_out, reference), reference)
    assert flagged.mean() <= 0.25
    # and the non-chest images score far above the typical held-out X-ray
    assert ood.score(classifier, np.stack(list(_non_chest().values())), reference).min() > np.median(
        ood.score(classifier, held_out, reference))


@pytest.mark.parametrize("n", [2, 3, 7])
def test_few_fitting_images_stay_finite(classifier, n):
    ref = ood.fit(classifier, _xrays(range(n)))
    assert ref["threshold_from"].startswith("in-sample")  # too few to hold 5 folds out
    scores = ood.score(classifier, np.concatenate([_xrays(range(200, 203)), np.stack(list(_non_chest().values()))]), ref)
    assert np.isfinite(scores).all() and (scores >= 0).all()


def test_one_tap_and_empty_input(classifier):
    ref = ood.fit(classifier, _xrays(range(12)), taps=(2,))
    assert ref["features"] == 32 and ref["taps"] == [2]
    assert ood.score(classifier, np.zeros((0, PIXELS, PIXELS), np.uint8), ref).shape == (0,)
    assert ood.score(classifier, _xrays([5])[..., None], ref).shape == (1,)  # (N, p, p, 1) accepted


def test_flags_compare_with_the_threshold_and_flag_nan():
    ref = {"threshold": 2.0}
    np.testing.assert_array_equal(ood.flags([1.0, 2.0, 2.0001, float("nan")], ref), [False, False, True, True])


def test_ill_inputs_raise(classifier, reference):
    good = _xrays(range(4))
    cases = [
        (lambda: ood.fit(classifier, good[:1]), "at least 2"),
        (lambda: ood.fit(classifier, good, false_alarm=0.0), "false_alarm"),
        (lambda: ood.fit(classifier, good, false_alarm=0.6), "false_alarm"),
        (lambda: ood.fit(classifier, good, taps=(3,)), "taps"),
        (lambda: ood.fit(classifier, good, folds=1), "folds"),
        (lambda: ood.score(classifier, np.zeros((2, 32, 32), np.uint8), reference), "classifier takes 64x64"),
        (lambda: ood.score(classifier, np.zeros((64, 64), np.uint8), reference), r"\(N, p, p\)"),
        (lambda: ood.score(classifier, good, {**reference, "method": "other"}), "unknown OOD method"),
        (lambda: ood.score(classifier, good, {"threshold": 1.0}), "not an OOD reference"),
        (lambda: ood.score(classifier, good, {**reference, "mean": reference["mean"][:5]}), "another model"),
        (lambda: ood.flags([1.0], {}), "not an OOD reference"),
        (lambda: ood.fit(models.build_unet(PIXELS, depth=3, filters=4), good), "nested 'backbone'"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
