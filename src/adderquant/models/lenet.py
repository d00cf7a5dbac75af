"""Adder LeNet-5 for 28x28 grayscale images (MNIST, Fashion-MNIST)."""

from __future__ import annotations

import torch
from torch import nn

from adderquant.nn import Adder2d


class AdderLeNet5(nn.Module):
    """conv5x5 -> pool -> adder5x5 -> pool -> adder5x5 -> adder1x1 -> 1x1 conv + BN classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = Adder2d(6, 16, kernel_size=5)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = Adder2d(16, 120, kernel_size=5)
        self.bn3 = nn.BatchNorm2d(120)
        self.conv4 = Adder2d(120, 84, kernel_size=1)
        self.bn4 = nn.BatchNorm2d(84)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Conv2d(84, num_classes, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.relu(self.bn4(self.conv4(x)))
        return self.bn5(self.fc(x)).flatten(1)
