"""Class-agnostic baseline maps, and the synthetic task's promise that they score low."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from calm_fast.evaluate.baselines import centre_gaussian_map, image_energy_map
from calm_fast.data.metadata import read_split
from calm_fast.data.synthetic import generate


def test_centre_gaussian_by_hand():
    g = centre_gaussian_map(5, 5)  # sigma = 0.25 * 5 = 1.25 px
    assert g.shape == (5, 5) and g.dtype == np.float32
    assert g[2, 2] == pytest.approx(1.0)
    assert g[2, 4] == pytest.approx(math.exp(-0.5 * (2 / 1.25) ** 2), rel=1e-6)
    assert g[0, 0] == pytest.approx(math.exp(-0.5 * 2 * (2 / 1.25) ** 2), rel=1e-6)
    wide = centre_gaussian_map(4, 9)
    assert np.array_equal(wide, wide[::-1, ::-1])  # centred on even and odd sides alike
    assert wide.argmax() in {np.ravel_multi_index((1, 4), (4, 9)), np.ravel_multi_index((2, 4), (4, 9))}


def test_energy_of_flat_and_step_images():
    assert not image_energy_map(np.full((16, 16, 3), 120, np.uint8)).any()
    step = np.zeros((12, 20, 3), np.uint8)
    step[:, 10:] = 10
    energy = image_energy_map(step, sigma_frac=0)
    # Sobel x on a step of 10: 4 * 10 on the two columns beside it, for each of 3 channels.
    expected = np.zeros((12, 20), np.float32)
    expected[:, 9:11] = 3 * 40.0**2
    np.testing.assert_allclose(energy, expected)


def test_energy_smoothing_is_a_gaussian_of_sigma_frac_times_the_side():
    step = np.zeros((224, 224), np.uint8)
    step[:, 112:] = 50
    profile = image_energy_map(step, sigma_frac=0.015)[112]
    x = np.arange(224) - 111.5  # the unsmoothed energy sits on columns 111 and 112
    variance = (profile * x**2).sum() / profile.sum()
    assert variance == pytest.approx((0.015 * 224) ** 2 + 0.25, rel=0.05)
    assert profile.sum() == pytest.approx(image_energy_map(step, 0)[112].sum(), rel=1e-3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="sigma_frac"):
        centre_gaussian_map(4, 4, sigma_frac=0)
    with pytest.raises(ValueError, match="shape"):
        image_energy_map(np.zeros((4,)))


def test_baselines_stay_low_on_the_synthetic_task(tmp_path):
    """DATA.md's calibration: the centred Gaussian and the smoothed energy map must not localize objects."""
    from calm_fast.metrics import BoxAccuracy, normalize_scoremaps, rescale_boxes

    generate(tmp_path, sizes={"test": 150}, workers=0)
    split = read_split(tmp_path / "metadata", "SYNTH", "test", tmp_path / "SYNTH")
    gt_boxes = [rescale_boxes(split.boxes[i], tuple(split.image_sizes[i])) for i in range(len(split))]
    images = [
        cv2.resize(cv2.imread(str(split.image_path(i)))[..., ::-1], (224, 224), interpolation=cv2.INTER_LINEAR)
        for i in range(len(split))
    ]

    def max_box_acc_v2(maps) -> float:
        metric = BoxAccuracy()
        metric.update(normalize_scoremaps(maps), gt_boxes)
        return metric.compute()["max_box_acc_v2"]

    assert max_box_acc_v2([centre_gaussian_map(224, 224)] * len(split)) <= 35
    assert max_box_acc_v2([image_energy_map(image, 0.015) for image in images]) <= 35
    # The same pipeline does reward a map that knows where the object is (the box itself, blurred).
    oracle = []
    for box in gt_boxes:
        m = np.zeros((224, 224), np.float32)
        x0, y0, x1, y1 = box[0]
        m[y0 : y1 + 1, x0 : x1 + 1] = 1
        oracle.append(cv2.GaussianBlur(m, (0, 0), 4))
    assert max_box_acc_v2(oracle) >= 90
