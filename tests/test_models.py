"""The backbones of :mod:`hybridfc.models`: shapes, gradients, grey input, bf16, channels_last, sizes.

Every test but the parameter counts runs a narrow network (width 0.25 for the CIFAR ResNets,
0.125 for the IR-ResNets) so the file stays fast on one CPU thread; the counts build the
full-width networks on the meta device, without memory or a forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from hybridfc.models import BACKBONES, build_backbone

EMBEDDING = 32
BATCH = 2
NARROW = {"resnet": 0.25, "iresnet": 0.125}


def image_size(name: str) -> int:
    return 112 if name.startswith("iresnet") else 32


def narrow(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    width = NARROW["iresnet" if name.startswith("iresnet") else "resnet"]
    return build_backbone(name, EMBEDDING, width=width, **kwargs)


def images(name: str, channels: int = 3) -> torch.Tensor:
    size = image_size(name)
    return torch.randn(BATCH, channels, size, size, generator=torch.Generator().manual_seed(1))


def calibrated(model: nn.Module, name: str, channels: int = 3) -> nn.Module:
    """``model`` in eval mode after one training-mode pass sets its BatchNorm statistics.

    Fresh statistics (mean 0, variance 1) let deep residual nets blow up in eval mode (about
    1e11 out of a fresh iresnet100), which says nothing about the layers under test.
    """
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.momentum = None  # the plain average of the batches seen
    size = image_size(name)
    with torch.no_grad():
        model.train()(torch.randn(8, channels, size, size, generator=torch.Generator().manual_seed(3)))
    return model.eval()


def parameter_count(name: str, embedding_size: int) -> int:
    with torch.device("meta"):
        model = build_backbone(name, embedding_size)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", BACKBONES)
def test_forward_backward_reach_every_parameter(name: str) -> None:
    model = narrow(name).train()
    out = model(images(name))
    assert out.shape == (BATCH, EMBEDDING)
    assert torch.isfinite(out).all()
    # a random projection: the batch sums of a BatchNorm1d output carry no gradient
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", BACKBONES)
def test_grey_input(name: str) -> None:
    model = calibrated(narrow(name, in_channels=1), name, channels=1)
    with torch.no_grad():
        out = model(images(name, channels=1))
    assert out.shape == (BATCH, EMBEDDING)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BACKBONES)
def test_bfloat16_close_to_float32(name: str) -> None:
    model = calibrated(narrow(name), name)
    x = images(name)
    with torch.no_grad():
        reference = model(x)
        out = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert (out.float() - reference).norm() <= 0.1 * reference.norm()


@pytest.mark.parametrize("name", BACKBONES)
def test_channels_last_matches_contiguous(name: str) -> None:
    model = calibrated(narrow(name), name)
    x = images(name)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_dropout_is_active_in_training_only() -> None:
    model = narrow("iresnet18", dropout=0.5)
    x = images("iresnet18")
    with torch.no_grad():
        assert_close(model.eval()(x), model(x))
        assert not torch.equal(model.train()(x), model(x))


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="resnet18.*known: .*iresnet18"):
        build_backbone("resnet18", EMBEDDING)


@pytest.mark.parametrize("size", [100, 120])
def test_iresnet_image_size_not_multiple_of_16(size: int) -> None:
    with pytest.raises(ValueError, match="image_size"):
        build_backbone("iresnet18", EMBEDDING, image_size=size)


def test_iresnet_other_image_size() -> None:
    model = narrow("iresnet18", image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(BATCH, 3, 64, 64)).shape == (BATCH, EMBEDDING)
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(BATCH, 3, 112, 112))


@pytest.mark.parametrize("size", [28, 33, 64])
def test_cifar_resnet_any_image_size(size: int) -> None:
    model = narrow("resnet20").eval()
    with torch.no_grad():
        assert model(torch.randn(BATCH, 3, size, size)).shape == (BATCH, EMBEDDING)


@pytest.mark.parametrize("width", [0.0, -1.0])
def test_width_must_be_positive(width: float) -> None:
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet20", EMBEDDING, width=width)


def test_resnet20_parameter_count() -> None:
    head = 64 * 64 + 64 + 2 * 64  # Linear(64 → 64) and BatchNorm1d(64)
    assert parameter_count("resnet20", 64) == 269_072 + head  # the paper's 0.27M body


def test_cifar_resnet_parameter_counts_grow_with_depth() -> None:
    counts = [parameter_count(name, 64) for name in ("resnet20", "resnet32", "resnet56")]
    assert 0.26e6 < counts[0] < counts[1] < counts[2] < 0.9e6


def test_iresnet50_parameter_count_matches_insightface() -> None:
    assert 43e6 < parameter_count("iresnet50", 512) < 44e6


def test_iresnet_state_dict_names_follow_insightface() -> None:
    with torch.device("meta"):
        keys = set(build_backbone("iresnet18", 512).state_dict())
    expected = {"conv1.weight", "bn1.weight", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight",
                "layer1.0.prelu.weight", "layer1.0.conv2.weight", "layer1.0.bn3.running_var",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight", "layer4.1.conv2.weight",
                "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_mean"}
    assert expected <= keys
    assert "layer1.1.downsample.0.weight" not in keys
