"""The AlexNet family (and ZFNet), and the classifier every ``model.arch`` is wrapped in; the other
CNNs of the tour are in :mod:`cifar_alexnet.core.zoo`. No file or data work here (torch only).

Every variant takes raw images, (N, 3, 32, 32) uint8 or float in [0, 255], and returns logits
(N, 10): normalisation (and the resize to 227x227 for ``alexnet_paper``) is the model's first
layer, so training, evaluation and a served MLflow model cannot disagree about preprocessing.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cifar_alexnet.core.architectures import ARCHITECTURES, ArchSpec, Conv
from cifar_alexnet.core.cifar10 import IMAGE_SHAPE, NUM_CLASSES
from cifar_alexnet.config import ModelConfig



# Paper LRN: b = a / (k + alpha * sum(a^2))^beta over n=5 channels. torch divides alpha by n,
# so pass alpha * n to get the paper's normalisation.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0
POOL_KERNEL, POOL_STRIDE = 3, 2


def _scaled(value: int, width: float) -> int:
    return max(1, round(value * width))


def _out_size(size: int, conv: Conv) -> int:
    size = (size + 2 * conv.padding - conv.kernel) // conv.stride + 1
    if conv.pool:
        size = (size - POOL_KERNEL) // POOL_STRIDE + 1
    return size


class InputAdapter(nn.Module):
    """uint8/[0,255] images -> normalised float, resized to the architecture's input size."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


class AlexNet(nn.Module):
    """5 conv + 3 FC layers with ReLU, overlapping max-pool and dropout on the FC layers.

    ``norm``: ``batch`` (BatchNorm after every conv), ``lrn`` (the paper's local response
    normalisation after conv1 and conv2) or ``none``.
    """

    def __init__(self, spec: ArchSpec, width: float = 1.0, dropout: float = 0.5,
                 norm: str = "batch", num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = IMAGE_SHAPE[0], spec.input_size
        for conv in spec.convs:
            out = _scaled(conv.channels, width)
            # BatchNorm follows every conv (its shift makes the conv bias redundant); LRN stays
            # where the paper put it, after the ReLU of the layers the spec marks.
            layers.append(nn.Conv2d(channels, out, conv.kernel, conv.stride, conv.padding,
                                    bias=norm != "batch"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            if norm == "lrn" and conv.lrn:
                layers.append(nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA * LRN_SIZE, LRN_BETA, LRN_K))
            if conv.pool:
                layers.append(nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE))
            channels, size = out, _out_size(size, conv)
        self.features = nn.Sequential(*layers)
        hidden1, hidden2 = (_scaled(h, width) for h in spec.hidden)
        self.flat_features = channels * size * size
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.flat_features, hidden1), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden1, hidden2), nn.ReLU(inplace=True),
            nn.Linear(hidden2, num_classes),
        )
        if spec.paper_init:
            self._paper_init()
        else:
            self._kaiming_init()

    def _kaiming_init(self) -> None:
        # He init keeps activations from shrinking through 8 ReLU layers; torch's default
        # (kaiming_uniform with a=sqrt(5)) makes this unnormalised net learn very slowly.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        head = self.classifier[-1]
        nn.init.normal_(head.weight, std=0.01)

    def _paper_init(self) -> None:
        # Paper: weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC layers
        # (gives the ReLUs positive inputs early on), 0 elsewhere.
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        linears = [m for m in self.classifier if isinstance(m, nn.Linear)]
        ones = {convs[1], convs[3], convs[4], linears[0], linears[1]}
        for module in convs + linears:
            nn.init.normal_(module.weight, std=0.01)
            if module.bias is not None:
                nn.init.constant_(module.bias, 1.0 if module in ones else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)            # (N, C, s, s)
        x = torch.flatten(x, 1)         # (N, C*s*s)
        return self.classifier(x)       # (N, num_classes)


class Classifier(nn.Module):
    """Raw images in, logits out: :class:`InputAdapter` followed by the network."""

    def __init__(self, config: ModelConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.config = config
        arch = ARCHITECTURES[config.arch]
        self.adapter = InputAdapter(mean, std, arch.input_size)
        if arch.spec is not None:
            self.net: nn.Module = AlexNet(arch.spec, config.width, config.dropout, config.norm)
        else:  # the tour's other CNNs, each with its own normalisation layers
            from cifar_alexnet.core import zoo

            self.net = getattr(zoo, arch.zoo)(config.width, config.dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(images))


class FlipTTA(nn.Module):
    """The classifier as evaluated and served with ``evaluate.flip_tta``: the mean of the logits
    of each image and of its mirror image (raw images in, logits out, like the classifier)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, classes)
        return (self.model(images).float() + self.model(images.flip(3)).float()) / 2


def build_model(config: ModelConfig, mean: Sequence[float] = (0.5, 0.5, 0.5),
                std: Sequence[float] = (0.25, 0.25, 0.25)) -> Classifier:
    return Classifier(config, mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, input_shape: Sequence[int] = IMAGE_SHAPE,
                  backward: bool = False) -> int:
    """FLOPs per image that torch's FlopCounterMode counts (convolutions and matrix products, 2
    per multiply-add) on a real pass of a batch of 2 on the model's device; with ``backward``,
    a training step's forward and backward (eval-mode layers: no dropout draw counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        images = torch.zeros(2, *input_shape, dtype=torch.uint8, device=device)
        with FlopCounterMode(display=False) as counter:
            if backward:
                model(images).sum().backward()
            else:
                with torch.no_grad():
                    model(images)
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def summary(model: nn.Module, input_shape: Sequence[int] = (2, *IMAGE_SHAPE)) -> str:
    """A text table of every layer: output shape and parameter count (a pass of zeros on the
    model's device)."""
    rows: list[tuple[str, str, str, int]] = []
    hooks = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            def hook(mod, _inp, out, name=name):
                rows.append((name, type(mod).__name__, str(tuple(out.shape)),
                             sum(p.numel() for p in mod.parameters())))
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(*input_shape, dtype=torch.uint8,
                              device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    width = max(len(r[0]) for r in rows)
    lines = [f"{'layer':<{width}}  {'type':<18} {'output shape':<20} {'params':>12}"]
    lines += [f"{n:<{width}}  {t:<18} {s:<20} {p:>12,}" for n, t, s, p in rows]
    lines.append(f"{'total':<{width}}  {'':<18} {'':<20} {count_parameters(model):>12,}")
    lines.append(f"{forward_flops(model, tuple(input_shape[1:])) / 1e9:.4f} GFLOP per image "
                 "(forward, FlopCounterMode)")
    return "\n".join(lines) + "\n"
