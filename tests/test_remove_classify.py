"""Remove-and-classify: which pixels are erased, keyed randomness, tie-breaking and the pooled R_k counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm_fast.evaluate.attribution.keyed_random import RANDOM_ERASURE, TIE_BREAK, key64, keyed_hash31
from calm_fast.evaluate.attribution.model_fns import model_classifier
from calm_fast.evaluate.attribution.remove_classify import (
    pixel_ranks,
    random_erasures,
    remove_and_classify,
    resize_maps,
    top_erasures,
)
from calm_fast.metrics.remove_classify import FRACTIONS, RemoveClassifyCounts, erased_pixel_count
from calm_fast.models import build_model

SIDE = 10  # 10×10 inputs: 100 pixels, so k = 10 % erases exactly 10 of them


class RecordingClassifier:
    """Predicts class 1 while pixel (9, 5) (flat index 95) is intact, else class 0; keeps every input."""

    def __init__(self):
        self.inputs = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images.clone())
        intact = (images[:, 0, 9, 5] != 0).float()
        return torch.stack([1 - intact, intact], dim=1)


class ZeroPatternClassifier:
    """Class scores = (which pixels are zero) @ fixed random weights: any change of a mask can change them."""

    def __init__(self, num_pixels: int, num_classes: int = 3):
        self.weights = torch.randn(num_pixels, num_classes, generator=torch.Generator().manual_seed(5))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images[:, 0] == 0).flatten(1).float() @ self.weights


def test_erased_pixel_count_truncates_like_the_reference():
    assert [erased_pixel_count(f, 224 * 224) for f in FRACTIONS] == [5017, 15052, 25088, 35123, 45158]
    assert erased_pixel_count(0.1, 100) == 10


def test_top_k_of_a_known_map_erases_exactly_those_pixels_and_counts_by_hand():
    images = 1.0 + torch.rand(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))  # no zero pixel
    ascending = torch.arange(SIDE * SIDE, dtype=torch.float32).reshape(SIDE, SIDE)
    maps = torch.stack([ascending, ascending, -ascending])  # image 2: the top pixels are 0 .. n-1
    labels = torch.tensor([1, 0, 0])
    fractions = (0.1, 0.3)
    counts = RemoveClassifyCounts(["m"], fractions)
    classifier = RecordingClassifier()
    remove_and_classify(classifier, images, labels, [0, 1, 2], {"m": maps}, counts, max_batch=1000)

    (inputs,) = classifier.inputs  # one call: 3 images × (clean + 2 random + 2 top) rows, image-major
    assert inputs.shape == (15, 3, SIDE, SIDE)
    rows = inputs.reshape(3, 5, 3, SIDE * SIDE)
    random = random_erasures([0, 1, 2], fractions, SIDE * SIDE)
    for i in range(3):
        assert torch.equal(rows[i, 0], images[i].flatten(1))  # the clean row
        for column, (fraction, count) in enumerate(zip(fractions, (10, 30))):
            top_set = set(range(100 - count, 100)) if i < 2 else set(range(count))
            zeros = (rows[i, 3 + column] == 0).all(dim=0).nonzero().flatten().tolist()
            assert set(zeros) == top_set  # erased in every channel
            kept = sorted(set(range(100)) - top_set)
            assert torch.equal(rows[i, 3 + column][:, kept], images[i].flatten(1)[:, kept])  # nothing else touched
            random_zeros = (rows[i, 1 + column] == 0).all(dim=0)
            assert torch.equal(random_zeros, random[i, column])
            assert int(random_zeros.sum()) == count

    # By hand: clean predictions are all 1 (pixel 95 intact): correct only for image 0.
    # Top-k: images 0, 1 lose pixel 95 (their top 10 is 90..99) -> predict 0: correct for image 1 only;
    # image 2 keeps it (its top pixels are 0..9, 0..29) -> predicts 1, wrong (label 0).
    # Random: predict 0 iff pixel 95 was drawn; correct iff that agrees with label == 0.
    hit = random[:, :, 95]
    expected_random = [int(((hit[:, c]) == (labels == 0)).sum()) for c in range(2)]
    state = counts.state_dict()
    assert int(state["num_images"]) == 3 and int(state["clean_correct"]) == 1
    assert state["top_correct"].tolist() == [[1, 1]]
    assert state["random_correct"].tolist() == expected_random


def test_resize_is_bilinear_with_half_pixel_centres():
    small = torch.tensor([[[0.0, 4.0], [8.0, 12.0]]])
    big = resize_maps(small, (4, 4))
    # Output pixel centre 1 maps to input coordinate (1 + 0.5) / 2 - 0.5 = 0.25.
    assert big[0, 1, 1].item() == pytest.approx(0.75 * 0.75 * 0 + 0.75 * 0.25 * 4 + 0.25 * 0.75 * 8 + 0.25 * 0.25 * 12)
    assert big[0, 0, 0].item() == 0.0 and big[0, 3, 3].item() == 12.0  # edges clamp


def test_random_erasures_are_exact_keyed_fresh_per_k_and_spread_evenly():
    indices = list(range(200))
    masks = random_erasures(indices, (0.1, 0.5, 0.9), 100, seed=3)
    assert (masks.sum(dim=2) == torch.tensor([10, 50, 90])).all()
    # Keyed on (seed, index, k): any subset, in any order, gives the same rows.
    assert torch.equal(random_erasures([17, 4], (0.1, 0.5, 0.9), 100, seed=3), masks[[17, 4]])
    assert torch.equal(random_erasures([4], (0.5,), 100, seed=3)[0, 0], masks[4, 1])
    assert not torch.equal(random_erasures(indices, (0.1, 0.5, 0.9), 100, seed=4), masks)
    # Fresh per k: the 10 % draw is not nested in the 50 % one (it would be for every image if nested).
    nested = (masks[:, 0] & ~masks[:, 1]).sum(dim=1) == 0
    assert nested.float().mean() < 0.05
    # Each pixel is erased at the 50 % fraction in about half of the 200 images (binomial sd 0.035).
    frequency = masks[:, 1].float().mean(dim=0)
    assert frequency.min() > 0.35 and frequency.max() < 0.65


def test_ties_are_broken_by_a_seeded_order_that_respects_the_values():
    plateau = torch.zeros(4, 5, 5)
    plateau[:, 0, :3] = 2.0
    plateau[:, 4, :] = 1.0
    plateau[1] = -plateau[1]  # negative values and -0.0 in one map
    plateau[1, 2, 2] = -0.0
    ranks = pixel_ranks(plateau, [10, 11, 12, 13], seed=0)
    for i in range(4):
        assert sorted(ranks[i].tolist()) == list(range(25))  # a permutation
        order = ranks[i].argsort()
        values = plateau[i].flatten()[order]
        assert (values[:-1] >= values[1:]).all()  # non-increasing along the ranking
    # Deterministic and independent of the batch it comes in.
    assert torch.equal(pixel_ranks(plateau[2:3], [12], seed=0), ranks[2:3])
    assert torch.equal(pixel_ranks(plateau[[3, 0]], [13, 10], seed=0), ranks[[3, 0]])
    # Same map, different images or seeds: different orders inside the plateaus.
    assert not torch.equal(ranks[0], ranks[2])
    assert not torch.equal(pixel_ranks(plateau[:1], [10], seed=1), ranks[:1])
    # An all-tied map: which pixel comes first is spread over the map, image by image.
    first = pixel_ranks(torch.zeros(100, 2, 5), list(range(100))).argmin(dim=1)
    assert len(first.unique()) >= 8


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_maps_are_refused(value):
    from calm_fast.errors import NonFiniteMapError

    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 1] = value
    with pytest.raises(NonFiniteMapError, match="NaN or ±inf"):
        pixel_ranks(maps, [0])


def test_top_erasures_read_every_fraction_off_one_ranking():
    ranks = pixel_ranks(torch.arange(100.0).reshape(1, 10, 10), [0])
    masks = top_erasures(ranks, (0.1, 0.3))
    assert masks[0, 0].nonzero().flatten().tolist() == list(range(90, 100))
    assert masks[0, 1].nonzero().flatten().tolist() == list(range(70, 100))


def _run_counts(classifier, images, labels, indices, maps, image_batch, max_batch, clean=None):
    counts = RemoveClassifyCounts(list(maps), FRACTIONS)
    for start in range(0, len(images), image_batch):
        part = slice(start, start + image_batch)
        remove_and_classify(classifier, images[part], labels[part], indices[part],
                            {name: m[part] for name, m in maps.items()}, counts, seed=7, max_batch=max_batch,
                            clean_predictions=None if clean is None else clean[part])
    return counts


def test_counts_do_not_depend_on_batch_size_chunking_or_shards():
    generator = torch.Generator().manual_seed(1)
    images = 1.0 + torch.rand(6, 3, SIDE, SIDE, generator=generator)
    labels = torch.randint(0, 3, (6,), generator=generator)
    indices = torch.tensor([5, 8, 13, 21, 34, 55])
    ties = torch.zeros(6, 5, 5)
    ties[:, 1:3, 1:4] = 1.0
    maps = {"smooth": torch.rand(6, 5, 5, generator=generator), "plateau": ties}  # low-res: resized
    classifier = ZeroPatternClassifier(SIDE * SIDE)
    reference = _run_counts(classifier, images, labels, indices, maps, image_batch=6, max_batch=10_000)
    for image_batch, max_batch in ((1, 1), (3, 3), (6, 7), (2, 10_000)):
        other = _run_counts(classifier, images, labels, indices, maps, image_batch, max_batch)
        for key, value in reference.state_dict().items():
            np.testing.assert_array_equal(other.state_dict()[key], value, err_msg=f"{image_batch}/{max_batch} {key}")
    # Two shards (rank r takes samples r, r + 2, ...), merged: the same integers.
    shards = [_run_counts(classifier, images[r::2], labels[r::2], indices[r::2],
                          {n: m[r::2] for n, m in maps.items()}, image_batch=2, max_batch=5) for r in (0, 1)]
    merged = shards[0].merge(shards[1])
    for key, value in reference.state_dict().items():
        np.testing.assert_array_equal(merged.state_dict()[key], value)
    # Handing in the clean predictions skips their pass and counts the same.
    clean = classifier(images).argmax(dim=1)
    given = _run_counts(classifier, images, labels, indices, maps, image_batch=4, max_batch=9, clean=clean)
    for key, value in reference.state_dict().items():
        np.testing.assert_array_equal(given.state_dict()[key], value)
    # The counts are sensitive to the masks: another seed changes them.
    reseeded = RemoveClassifyCounts(list(maps), FRACTIONS)
    remove_and_classify(classifier, images, labels, indices, maps, reseeded, seed=8)
    assert not all(np.array_equal(reseeded.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_r_k_pools_counts_over_the_split_by_hand():
    first = RemoveClassifyCounts(["calm", "cam"], (0.1, 0.5))
    first.add(10, 9, np.array([8, 4]), np.array([[1, 0], [6, 3]]))
    second = RemoveClassifyCounts(["calm", "cam"], (0.1, 0.5))
    second.add(5, 2, np.array([2, 0]), np.array([[2, 1], [1, 0]]))
    result = first.merge(second).compute()
    assert result["num_images"] == 15
    assert result["clean_accuracy"] == pytest.approx(100 * 11 / 15)
    assert result["random_accuracy"] == pytest.approx([100 * 10 / 15, 100 * 4 / 15])
    # Pooled: (1 + 2) / (8 + 2) and (0 + 1) / (4 + 0), not a mean of per-shard ratios.
    assert result["maps"]["calm"]["r_k"] == pytest.approx([0.3, 0.25])
    assert result["maps"]["cam"]["r_k"] == pytest.approx([0.7, 0.75])
    assert result["maps"]["cam"]["top_accuracy"] == pytest.approx([100 * 7 / 15, 100 * 3 / 15])
    empty_random = RemoveClassifyCounts(["m"], (0.1,))
    empty_random.add(2, 2, np.array([0]), np.array([[1]]))
    assert empty_random.compute()["maps"]["m"]["r_k"] == [None]


def test_state_round_trip_and_bad_states():
    counts = RemoveClassifyCounts(["a"], (0.1, 0.3))
    counts.add(4, 3, np.array([2, 1]), np.array([[1, 0]]))
    other = RemoveClassifyCounts(["a"], (0.1, 0.3))
    other.load_state_dict({k: torch.from_numpy(v) for k, v in counts.state_dict().items()})
    assert other.compute() == counts.compute()
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({**counts.state_dict(), "random_correct": np.zeros(3, np.int64)})
    with pytest.raises(ValueError, match="integer"):
        other.load_state_dict({**counts.state_dict(), "top_correct": np.zeros((1, 2))})
    with pytest.raises(ValueError, match="cannot merge"):
        counts.merge(RemoveClassifyCounts(["b"], (0.1, 0.3)))
    with pytest.raises(ValueError, match="fractions"):
        RemoveClassifyCounts(["a"], (0.0, 0.5))
    with pytest.raises(RuntimeError):
        RemoveClassifyCounts(["a"]).compute()


def test_missing_map_and_mismatched_batch_are_clear_errors():
    counts = RemoveClassifyCounts(["joint"], (0.5,))
    images = torch.ones(2, 3, 4, 4)
    with pytest.raises(ValueError, match="joint"):
        remove_and_classify(lambda x: torch.zeros(len(x), 2), images, [0, 1], [0, 1], {"class": torch.ones(2, 4, 4)},
                            counts)
    with pytest.raises(ValueError, match="holds 3 maps"):
        remove_and_classify(lambda x: torch.zeros(len(x), 2), images, [0, 1], [0, 1],
                            {"joint": torch.ones(3, 4, 4)}, counts)


@pytest.mark.parametrize("method", ["cam", "calm-em"])
def test_a_wsol_model_classifies_every_erased_input(method):
    torch.manual_seed(0)
    model = build_model("tiny_resnet", 4, method).eval()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([0, 1])
    classify = model_classifier(model, method)
    with torch.no_grad():
        class_logits, _ = model(images)
    maps = {"class": class_logits[torch.arange(2), labels]}  # 4×4 maps, resized to 32×32
    counts = RemoveClassifyCounts(["class"], (0.1, 0.5))
    remove_and_classify(classify, images, labels, [0, 1], maps, counts, max_batch=8)
    clean = classify(images).argmax(dim=1)
    assert int(counts.clean_correct) == int((clean == labels).sum())
    assert int(counts.num_images) == 2
    assert (counts.random_correct <= 2).all() and (counts.top_correct <= 2).all()


def _mix31_python(value: int) -> int:
    """The hash's definition in plain Python integers (no tensors, no overflow questions)."""
    value ^= value >> 16
    value = (value * 0x7FEB352D) % (1 << 31)
    value ^= value >> 15
    value = (value * 0x046CA68B) % (1 << 31)
    return value ^ (value >> 16)


def test_keyed_hash_matches_its_integer_definition_and_is_a_permutation():
    keys = [key64(RANDOM_ERASURE, 0, 5, 100_000), key64(TIE_BREAK, -3, 2**40)]
    hashed = keyed_hash31(keys, 4096)
    for row, key in enumerate(keys):
        low, high = key % (1 << 31), (key >> 31) % (1 << 31)
        for index in (0, 1, 77, 4095):
            expected = _mix31_python((_mix31_python(index ^ low) + high) % (1 << 31))
            assert int(hashed[row, index]) == expected
        assert len(hashed[row].unique()) == 4096  # distinct: a random order without ties
    assert not torch.equal(hashed[0], hashed[1])
    assert key64(1, 2) != key64(2, 1) and key64(1, 2) == key64(1, 2)
