"""A small conv net for 32x32 RGB images (CIFAR-shaped), as a pdv ModelDef without a TP plan.

    pdv profile model convnet --device cpu -o conv.json

Layers: "stem" (conv 3 -> width), "conv0".."conv{n-1}" (conv-norm-relu, doubling the channels
and halving the resolution each), and "head" (global average pool + linear classifier).
GroupNorm, not BatchNorm, so a micro-batch's statistics never depend on how a batch was split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdv.errors import PdvError
from pdv.models import ModelDef

__all__ = ["ConvBlock", "convnet"]


class ConvBlock(nn.Module):
    """3x3 conv (stride 2 halves the resolution), GroupNorm, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.GroupNorm(min(8, c_out), c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class Classifier(nn.Module):
    """Global average pool over the image, then a linear layer to class logits."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def convnet(n_block: int = 3, width: int = 16, image_size: int = 32,
            num_classes: int = 10) -> ModelDef:
    """stem, n_block strided conv blocks, classifier head; cross entropy on random labels."""
    if n_block < 1 or width < 1 or num_classes < 2:
        raise PdvError("convnet needs n_block >= 1, width >= 1, num_classes >= 2")
    if image_size < 2**n_block:
        raise PdvError(f"image_size={image_size} is too small for {n_block} halvings; "
                       f"use image_size >= {2**n_block}")
    layers: list[tuple[str, nn.Module]] = [("stem", ConvBlock(3, width, stride=1))]
    channels = width
    for i in range(n_block):
        layers.append((f"conv{i}", ConvBlock(channels, channels * 2, stride=2)))
        channels *= 2
    layers.append(("head", Classifier(channels, num_classes)))

    def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randn(mbs, 3, image_size, image_size, generator=gen, device="cpu")
        labels = torch.randint(num_classes, (mbs,), generator=gen, device="cpu")
        return images, labels

    return ModelDef(layers=layers, make_batch=make_batch, loss_fn=F.cross_entropy)
