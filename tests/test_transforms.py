"""Batched random crop and flip: equal to a per-image reference, independent per image, seeded."""

import torch
import torch.nn.functional as F

from cifar_alexnet.core.transforms import CROP_PADDING, random_crop_flip


def reference_crop_flip(images, dy, dx, flip, padding):
    """Per-image loop: the obvious implementation the batched version must match."""
    padded = F.pad(images, (padding,) * 4)
    out = []
    for i in range(len(images)):
        crop = padded[i, :, dy[i]:dy[i] + images.shape[2], dx[i]:dx[i] + images.shape[3]]
        out.append(crop.flip(2) if flip[i] else crop)
    return torch.stack(out)


def draws(n, generator, padding):
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    return dy, dx, torch.rand(n, generator=generator) < 0.5


def test_matches_per_image_reference_on_fixed_seed():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    batched = random_crop_flip(images, torch.Generator().manual_seed(5))
    expected = reference_crop_flip(images, *draws(64, torch.Generator().manual_seed(5),
                                                  CROP_PADDING), CROP_PADDING)
    assert batched.dtype == torch.uint8 and batched.shape == images.shape
    assert torch.equal(batched, expected)


def test_crops_and_flips_are_independent_per_image():
    image = torch.randint(1, 256, (1, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(image.repeat(200, 1, 1, 1), torch.Generator().manual_seed(0))
    distinct = {bytes(o.numpy()) for o in out}
    assert len(distinct) > 50  # 81 offsets x 2 flips available
    flips_seen = sum(torch.equal(o, image[0].flip(2)) for o in out)
    unchanged_seen = sum(torch.equal(o, image[0]) for o in out)
    assert flips_seen > 0 and unchanged_seen > 0
    # Values only come from the image or the zero padding.
    assert set(out.unique().tolist()) <= set(image.unique().tolist()) | {0}


def test_deterministic_for_a_seed_and_float_input():
    images = torch.rand(8, 3, 32, 32)
    a = random_crop_flip(images, torch.Generator().manual_seed(1))
    b = random_crop_flip(images, torch.Generator().manual_seed(1))
    c = random_crop_flip(images, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
