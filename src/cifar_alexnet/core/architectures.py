"""Every `model.arch`, in one table: how it is built and which of model.dropout and model.norm it
uses. Plain data (no torch), so params are validated against it without importing torch; the
model (core/model.py) builds from it, and tuning searches model.dropout only where it is used.

Adding an architecture is one entry here: an AlexNet-style `ArchSpec`, or the name of a builder
function of core/zoo.py, `builder(width, dropout) -> nn.Module` taking 32 x 32 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Conv:
    channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    lrn: bool = False   # local response normalisation after the ReLU
    pool: bool = False  # overlapping 3x3 stride-2 max-pool after that


@dataclass(frozen=True)
class ArchSpec:
    """An AlexNet-family network: convolutions, then two hidden FC layers with dropout."""
    input_size: int
    convs: tuple[Conv, ...]
    hidden: tuple[int, int]  # widths of the two hidden FC layers
    paper_init: bool = False


@dataclass(frozen=True)
class Architecture:
    spec: ArchSpec | None = None  # an AlexNet-family network (core/model.py builds it)...
    zoo: str | None = None        # ...or a builder of core/zoo.py
    dropout: bool = True          # model.dropout is used
    norm: bool = False            # model.norm is used (else the net has its own BatchNorm, or none)

    @property
    def input_size(self) -> int:
        return self.spec.input_size if self.spec else 32


ARCHITECTURES: dict[str, Architecture] = {
    # The widely reproduced 32x32 adaptation: 32 -> 29 -> pool 14 -> pool 6; 256*6*6 = 9216.
    "alexnet": Architecture(ArchSpec(32, (
        Conv(96, 4, lrn=True),
        Conv(256, 5, padding=2, lrn=True, pool=True),
        Conv(384, 3, padding=1),
        Conv(384, 3, padding=1),
        Conv(256, 3, padding=1, pool=True),
    ), (4096, 4096)), norm=True),
    # Reduced variant: 32 -> pool 15 -> pool 7 -> 5 (last conv unpadded); 128*5*5 = 3200.
    "alexnet_small": Architecture(ArchSpec(32, (
        Conv(64, 5, padding=2, lrn=True, pool=True),
        Conv(192, 5, padding=2, lrn=True, pool=True),
        Conv(256, 3, padding=1),
        Conv(256, 3, padding=1),
        Conv(128, 3),
    ), (2048, 2048)), norm=True),
    # Krizhevsky et al. 2012 on 227x227: 227 -> 55 -> pool 27 -> pool 13 -> pool 6; 9216.
    "alexnet_paper": Architecture(ArchSpec(227, (
        Conv(96, 11, stride=4, lrn=True, pool=True),
        Conv(256, 5, padding=2, lrn=True, pool=True),
        Conv(384, 3, padding=1),
        Conv(384, 3, padding=1),
        Conv(256, 3, padding=1, pool=True),
    ), (4096, 4096), paper_init=True), norm=True),
    # Zeiler & Fergus 2013 scaled to 32x32: AlexNet with a smaller first filter and stride
    # (the paper's 7x7/2 for 11x11/4) and wider conv3-5 (512, 1024, 512):
    # 32 -> 16 -> pool 7 -> pool 3; 512*3*3 = 4608.
    "zfnet": Architecture(ArchSpec(32, (
        Conv(96, 7, stride=2, padding=3, lrn=True),
        Conv(256, 5, padding=2, lrn=True, pool=True),
        Conv(512, 3, padding=1),
        Conv(1024, 3, padding=1),
        Conv(512, 3, padding=1, pool=True),
    ), (4096, 4096)), norm=True),
    # The tour's other CNNs, built from torchvision's definitions (core/zoo.py).
    "lenet5": Architecture(zoo="lenet5", dropout=False),
    "vgg11_bn": Architecture(zoo="vgg11_bn"),
    "vgg16_bn": Architecture(zoo="vgg16_bn"),
    "googlenet": Architecture(zoo="googlenet"),
    "resnet18": Architecture(zoo="resnet18", dropout=False),
}
