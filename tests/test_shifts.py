"""Acquisition shifts keep the contract (grey uint8; the same shape unless they change the field
of view, which the seed's resize then squares) and really change the image."""

import numpy as np
import pytest

from neumo import shifts, synthetic


@pytest.mark.parametrize("name", sorted(shifts.SHIFTS))
def test_shift_contract(name):
    image, _ = synthetic.make_xray(3, 128)
    out = shifts.SHIFTS[name](image)
    assert out.dtype == np.uint8 and out.ndim == 2
    if out.shape == image.shape:
        assert np.abs(out.astype(int) - image).mean() > 0.5
    else:
        assert name in ("wide view 1.2", "aspect 0.8")


def test_marker_is_bright_and_local():
    image = np.full((200, 200), 60, np.uint8)
    out = shifts.marker(image)
    changed = out != image
    assert out.max() >= 250 and changed[:40].sum() > 0 and not changed[100:].any()


def test_acquisition_is_a_tighter_view_sometimes_noisy_and_reproducible():
    image, _ = synthetic.make_xray(5, 200)
    outs = [shifts.acquisition(image, shifts.acquisition_rng("a.png", k)) for k in range(1, 41)]
    for out in outs:
        assert out.dtype == np.uint8 and out.ndim == 2
        h, w = out.shape
        assert 0.74 * 200 <= h <= 200 and 0.74 * 200 <= w <= 200
    assert len({o.shape for o in outs}) > 20  # the field of view varies
    again = shifts.acquisition(image, shifts.acquisition_rng("a.png", 1))
    assert np.array_equal(again, outs[0])  # same (id, copy): same bytes, in any worker
    other = shifts.acquisition(image, shifts.acquisition_rng("b.png", 1))
    assert other.shape != outs[0].shape or not np.array_equal(other, outs[0])

    flat = np.full((100, 100), 128, np.uint8)  # on a flat image only noise changes pixels
    share = np.mean([shifts.acquisition(flat, shifts.acquisition_rng("f.png", k)).std() > 0 for k in range(1, 201)])
    assert 0.38 <= share <= 0.6  # about ACQ_NOISE_SHARE of the copies


def test_acquisition_rejects_non_grey():
    with pytest.raises(ValueError):
        shifts.acquisition(np.zeros((10, 10, 3), np.uint8), np.random.default_rng(0))
