"""The AlexNet family: shapes, widths, normalisation layers, the paper's 227x227 variant and its init."""

import pytest
import torch
from torch import nn

from cifar_alexnet.config import ModelConfig
from cifar_alexnet.core.architectures import ARCHITECTURES
from cifar_alexnet.core.model import AlexNet, build_model, count_parameters, summary
from cifar_alexnet.tools.throughput import multiply_adds


@pytest.mark.parametrize("arch,input_size,flat,params", [
    ("alexnet", 32, 9216, 58_292_074),
    ("alexnet_small", 32, 3200, 12_412_490),
    ("alexnet_paper", 227, 9216, 58_322_314),
])
def test_full_width_shapes(arch, input_size, flat, params):
    net = AlexNet(ARCHITECTURES[arch].spec, width=1.0, dropout=0.5, norm="lrn")
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert len(convs) == 5 and len(linears) == 3
    assert net.flat_features == flat == linears[0].in_features
    assert count_parameters(net) == params
    with torch.no_grad():
        assert net(torch.randn(2, 3, input_size, input_size)).shape == (2, 10)


@pytest.mark.parametrize("norm,layer,count", [("batch", nn.BatchNorm2d, 5),
                                               ("lrn", nn.LocalResponseNorm, 2),
                                               ("none", None, 0)])
def test_norm_choice_sets_the_normalisation_layers(norm, layer, count):
    net = AlexNet(ARCHITECTURES["alexnet"].spec, width=1.0, norm=norm)
    kinds = (nn.BatchNorm2d, nn.LocalResponseNorm)
    assert [type(m) for m in net.features if isinstance(m, kinds)] == [layer] * count
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    # BatchNorm's shift replaces the conv bias: 1376 conv biases out, 2 x 1376 BN params in.
    assert all((c.bias is None) == (norm == "batch") for c in convs)
    lrn_params = 58_292_074
    assert count_parameters(net) == lrn_params + (1376 if norm == "batch" else 0)


def test_paper_arch_resizes_cifar_images_to_227():
    model = build_model(ModelConfig("alexnet_paper", 0.25, 0.5, "lrn"))
    assert model.adapter(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 3, 227, 227)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)


def test_paper_init_and_lrn_follow_the_paper():
    net = AlexNet(ARCHITECTURES["alexnet_paper"].spec, width=0.25, norm="lrn")
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert [float(c.bias.detach().mean()) for c in convs] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert [float(l.bias.detach().mean()) for l in linears] == [1.0, 1.0, 0.0]
    assert abs(float(linears[0].weight.detach().std()) - 0.01) < 0.001
    assert convs[0].kernel_size == (11, 11) and convs[0].stride == (4, 4)
    lrn = next(m for m in net.features if isinstance(m, nn.LocalResponseNorm))
    # torch divides alpha by size; the paper's alpha=1e-4 over n=5 means torch alpha 5e-4.
    assert (lrn.size, lrn.alpha / lrn.size, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)


def test_width_scales_channels_and_dropout_is_set():
    small = build_model(ModelConfig("alexnet", 0.125, 0.3, "batch"))
    convs = [m for m in small.net.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [12, 32, 48, 48, 32]
    assert small.net.classifier[1].out_features == 512
    assert [m.p for m in small.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]


def test_model_normalises_raw_images_with_dataset_statistics():
    model = build_model(ModelConfig("alexnet", 0.0625, 0.0, "none"), mean=(0.5, 0.25, 0.0),
                        std=(0.5, 0.25, 1.0))
    images = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    normalised = model.adapter(images)
    assert torch.allclose(normalised[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))


def test_summary_lists_layers_and_parameter_counts():
    model = build_model(ModelConfig("alexnet", 0.25, 0.5, "batch"))
    text = summary(model)
    assert "net.features.0" in text and "(2, 24, 29, 29)" in text
    total, flops = text.splitlines()[-2:]
    assert total.startswith("total") and f"{count_parameters(model):,}" in total
    # forward FLOPs: the same count the benchmark uses (2 per multiply-add)
    assert flops.endswith("GFLOP per image (forward, FlopCounterMode)")
    assert float(flops.split()[0]) == pytest.approx(2 * multiply_adds(model) / 1e9, abs=1e-4)
