"""The SWA paper's CIFAR networks, as its authors defined them, and small CPU-sized nets.

VGG16 (with and without BatchNorm), PreResNet (pre-activation; bottleneck blocks with
(depth-2)/9 per stage from depth 44, basic blocks with (depth-2)/6 below) and
WideResNet-28-10 follow the layer shapes and initialisation of the authors' code. Global
pooling is adaptive, so 28x28 inputs work as well as 32x32 ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ckptavg.nn.models import register_model

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))  # ceil: 28x28 inputs too
                continue
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(512, 512), nn.ReLU(True),
            nn.Dropout(), nn.Linear(512, 512), nn.ReLU(True),
            nn.Linear(512, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
                m.bias.data.zero_()

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.downsample = downsample

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        # As in the authors' code, the projection shortcut takes the block's raw input.
        return out + (x if self.downsample is None else self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class PreResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth >= 44:
            if (depth - 2) % 9:
                raise ValueError("PreResNet depth from 44 on must be 9n+2")
            n, block = (depth - 2) // 9, Bottleneck
        else:
            if (depth - 2) % 6:
                raise ValueError("PreResNet depth below 44 must be 6n+2")
            n, block = (depth - 2) // 6, BasicBlock
        self.inplanes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 16, n)
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / k))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideBasic(nn.Module):
    def __init__(self, in_planes, planes, dropout_rate, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True))

    def forward(self, x):
        out = self.dropout(self.conv1(torch.relu(self.bn1(x))))
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    def __init__(self, depth=28, widen_factor=10, dropout_rate=0.0, num_classes=10, in_channels=3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n+4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        self.layer1 = self._wide_layer(widths[1], n, dropout_rate, 1)
        self.layer2 = self._wide_layer(widths[2], n, dropout_rate, 2)
        self.layer3 = self._wide_layer(widths[3], n, dropout_rate, 2)
        self.bn1 = nn.BatchNorm2d(widths[3], momentum=0.9)
        self.linear = nn.Linear(widths[3], num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=math.sqrt(2))
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _wide_layer(self, planes, n, dropout_rate, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(WideBasic(self.in_planes, planes, dropout_rate, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = torch.relu(self.bn1(out))
        return self.linear(torch.flatten(self.avgpool(out), 1))


class ConvNetBN(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, width=32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class SmallVGG(nn.Module):
    """Two VGG blocks (two 3x3 conv-BN-ReLU, max-pool) and a hidden fully connected layer:
    enough capacity to fit a few thousand 28x28 images, as the paper's networks fit CIFAR."""

    def __init__(self, num_classes=10, in_channels=1, width=32, hidden=256):
        super().__init__()
        w = width

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(True)]

        self.features = nn.Sequential(*conv(in_channels, w), *conv(w, w), nn.MaxPool2d(2),
                                      *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
                                      nn.AdaptiveAvgPool2d(7))
        self.classifier = nn.Sequential(nn.Linear(2 * w * 49, hidden), nn.ReLU(True),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model
def vgg16(num_classes: int = 10, in_channels: int = 3):
    """VGG16 without BatchNorm, dropout classifier (SWA paper, CIFAR)."""
    return VGG(num_classes, in_channels, batch_norm=False)


@register_model
def vgg16_bn(num_classes: int = 10, in_channels: int = 3):
    """VGG16 with BatchNorm after every convolution."""
    return VGG(num_classes, in_channels, batch_norm=True)


@register_model
def preresnet20(num_classes: int = 10, in_channels: int = 3):
    """PreResNet-20: basic blocks, 3 per stage, 0.27M parameters (CPU-sized)."""
    return PreResNet(20, num_classes, in_channels)


@register_model
def preresnet110(num_classes: int = 10, in_channels: int = 3):
    """PreResNet-110: bottleneck blocks, 12 per stage (SWA paper)."""
    return PreResNet(110, num_classes, in_channels)


@register_model
def preresnet164(num_classes: int = 10, in_channels: int = 3):
    """PreResNet-164: bottleneck blocks, 18 per stage (SWA paper)."""
    return PreResNet(164, num_classes, in_channels)


@register_model
def wideresnet28_10(num_classes: int = 10, in_channels: int = 3, dropout_rate: float = 0.0):
    """WideResNet-28-10 (SWA paper)."""
    return WideResNet(28, 10, dropout_rate, num_classes, in_channels)


@register_model
def convnet_bn(num_classes: int = 10, in_channels: int = 1, width: int = 32):
    """Three conv-BN-ReLU stages and a linear head (trains in minutes on 2 CPU cores)."""
    return ConvNetBN(num_classes, in_channels, width)


@register_model
def vgg_small(num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 256):
    """Two VGG blocks and a 256-unit hidden layer, 0.87M parameters at width 32 (CPU-sized,
    over-parameterised for Fashion-MNIST subsets)."""
    return SmallVGG(num_classes, in_channels, width, hidden)
