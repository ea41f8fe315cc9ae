"""Acquisition shifts keep the contract (grey uint8, same shape) and really change the image."""

import numpy as np
import pytest

from neumo import shifts, synthetic


@pytest.mark.parametrize("name", sorted(shifts.SHIFTS))
def test_shift_contract(name):
    image, _ = synthetic.make_xray(3, 128)
    out = shifts.SHIFTS[name](image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).mean() > 0.5


def test_marker_is_bright_and_local():
    image = np.full((200, 200), 60, np.uint8)
    out = shifts.marker(image)
    changed = out != image
    assert out.max() >= 250 and changed[:40].sum() > 0 and not changed[100:].any()
