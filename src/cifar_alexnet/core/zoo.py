"""The CNNs around AlexNet, sized for 32 x 32 inputs: LeNet-5 (1998), VGG-11/16 with BatchNorm
(2014), GoogLeNet (2014) and ResNet-18 (2015). (ZFNet, 2013, is an AlexNet variant: model.py.)

Built from torchvision's definitions where they exist (``vgg.make_layers``, GoogLeNet's
``Inception`` and ``BasicConv2d``, ResNet's ``BasicBlock`` and ``_make_layer``), adapted the
documented CIFAR way: no downsampling stem (a 3x3 stride-1 first convolution, no max-pool), and
heads sized for what is left of a 32 x 32 image. ``width`` scales every layer's channels;
``dropout`` is used where the network has dropout (VGG's classifier, GoogLeNet's head).
"""

from __future__ import annotations

import importlib
import torch
from torch import nn

# The modules, not torchvision.models' functions of the same name (models.googlenet is both).
tv_googlenet = importlib.import_module("torchvision.models.googlenet")
tv_resnet = importlib.import_module("torchvision.models.resnet")
tv_vgg = importlib.import_module("torchvision.models.vgg")

from cifar_alexnet.core.cifar10 import IMAGE_SHAPE, NUM_CLASSES


def _scaled(value: int, width: float) -> int:
    return max(1, round(value * width))


class LeNet5(nn.Module):
    """LeCun et al. 1998 on 32 x 32: C1 5x5 (6) -> S2 -> C3 5x5 (16) -> S4 -> C5 5x5 (120) ->
    F6 (84) -> 10. Deviations from the paper, as in most reproductions: ReLU instead of the
    scaled tanh, max-pooling instead of trainable subsampling, C3 connected to every S2 map
    (not the paper's sparse table), RGB input, and a linear output instead of RBF units. It has
    no dropout; ``dropout`` is not used."""

    def __init__(self, width: float = 1.0, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        c1, c3, c5, f6 = (_scaled(c, width) for c in (6, 16, 120, 84))
        self.features = nn.Sequential(
            nn.Conv2d(IMAGE_SHAPE[0], c1, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(c1, c3, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),               # 10 -> 5
            nn.Conv2d(c3, c5, 5), nn.ReLU(inplace=True))                                # 1 x 1
        self.classifier = nn.Sequential(nn.Linear(c5, f6), nn.ReLU(inplace=True),
                                        nn.Linear(f6, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class VGG(nn.Module):
    """torchvision's VGG features (``make_layers``, BatchNorm) on 32 x 32: five max-pools leave
    1 x 1 x 512, so the head is 512 -> 512 -> 10 (the paper's 4096-wide FC layers were sized
    for 7 x 7 x 512), with dropout before each linear layer as in the paper."""

    def __init__(self, config: str, width: float = 1.0, dropout: float = 0.5,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers = [v if v == "M" else _scaled(v, width) for v in tv_vgg.cfgs[config]]
        self.features = tv_vgg.make_layers(layers, batch_norm=True)
        channels = _scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(channels, channels), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(channels, num_classes))
        for module in self.modules():  # torchvision's VGG initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# torchvision's GoogLeNet, block by block: (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj),
# "M" a 3x3 stride-2 max-pool.
GOOGLENET_BLOCKS: tuple[tuple[int, ...] | str, ...] = (
    (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "M",
    (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128), "M",
    (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128),
)


class GoogLeNet(nn.Module):
    """Szegedy et al. 2014 from torchvision's Inception blocks, with the CIFAR stem: one 3x3
    convolution to 192 channels instead of the 7x7/2 conv, max-pools and 1x1/3x3 convs that
    shrink a 224 image 8-fold; the two inner max-pools then take 32 -> 16 -> 8. No auxiliary
    classifiers; ``dropout`` before the final linear layer (the paper's 0.4)."""

    def __init__(self, width: float = 1.0, dropout: float = 0.4,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        channels = _scaled(192, width)
        layers: list[nn.Module] = [tv_googlenet.BasicConv2d(IMAGE_SHAPE[0], channels,
                                                            kernel_size=3, padding=1)]
        for block in GOOGLENET_BLOCKS:
            if block == "M":
                layers.append(nn.MaxPool2d(3, stride=2, ceil_mode=True))
                continue
            c1, c3r, c3, c5r, c5, pool = (_scaled(c, width) for c in block)
            layers.append(tv_googlenet.Inception(channels, c1, c3r, c3, c5r, c5, pool))
            channels = c1 + c3 + c5 + pool
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


def resnet18(width: float = 1.0, dropout: float = 0.0,
             num_classes: int = NUM_CLASSES) -> tv_resnet.ResNet:
    """torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2]) with the CIFAR stem of He et al.'s
    CIFAR experiments: a 3x3 stride-1 first convolution and no max-pool, so the four stages see
    32, 16, 8 and 4 pixels. ResNet has no dropout; ``dropout`` is not used."""
    net = tv_resnet.ResNet(tv_resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    planes = [_scaled(p, width) for p in (64, 128, 256, 512)]
    net.inplanes = planes[0]
    net.conv1 = nn.Conv2d(IMAGE_SHAPE[0], planes[0], 3, 1, 1, bias=False)
    net.bn1 = nn.BatchNorm2d(planes[0])
    net.maxpool = nn.Identity()
    for i, (name, p) in enumerate(zip(("layer1", "layer2", "layer3", "layer4"), planes)):
        setattr(net, name, net._make_layer(tv_resnet.BasicBlock, p, 2, stride=1 if i == 0 else 2))
    net.fc = nn.Linear(planes[-1], num_classes)
    for module in net.modules():  # torchvision's ResNet initialisation, for the rebuilt layers
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return net


# The builders core/architectures.py names: (width, dropout) -> network.
def lenet5(width: float, dropout: float) -> nn.Module:
    return LeNet5(width)  # no dropout


def vgg11_bn(width: float, dropout: float) -> nn.Module:
    return VGG("A", width, dropout)


def vgg16_bn(width: float, dropout: float) -> nn.Module:
    return VGG("D", width, dropout)


def googlenet(width: float, dropout: float) -> nn.Module:
    return GoogLeNet(width, dropout)
