"""Image transforms: training augmentation, applied to whole batches on the training device (no
per-image loop), and the resize that turns any picture into a CIFAR-sized input.

Normalisation is not here: it is the model's first layer (:class:`model.InputAdapter`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CROP_PADDING = 4


def random_crop_flip(images: torch.Tensor, generator: torch.Generator,
                     padding: int = CROP_PADDING) -> torch.Tensor:
    """Per image: a random crop from the zero-padded image and a horizontal flip with p=0.5.

    images: (N, C, H, W), any dtype; returns the same shape and dtype on the same device.
    """
    n, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))          # (N, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h, device=device)                   # (N, H)
    cols = dx[:, None] + torch.arange(w, device=device)                   # (N, W)
    # Reading columns right-to-left flips the crop horizontally.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()


def fit_to_input(image: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Any uint8 RGB image (3, H, W) as a (3, size, size) uint8 input, the way CIFAR-10 was
    made (whole photographs scaled down): the shorter side resized to ``size`` (bilinear with
    antialiasing), then the centre cropped to a square. A ``size`` x ``size`` image is returned
    unchanged, so a CIFAR image saved losslessly is classified exactly as in evaluation."""
    _, h, w = image.shape
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[:, top:top + size, left:left + size]
    return crop.round().clamp(0, 255).to(torch.uint8)
