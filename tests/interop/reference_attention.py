#!/usr/bin/python3
"""Reference attention modules for the weight-import tests (tests/interop/test_import.cpp).

The public packages (timm, the CBAM authors' code) are not installable here, so this file
re-implements the forward pass of each reference module with the same parameter names:
timm's SEModule, EcaModule, CbamModule and NonLocalAttn (timm/layers/*.py) and CBAM from
Jongchan/attention-module (MODELS/cbam.py). For every case it writes, into --out DIR:
  <case>.weights.safetensors   the module's state_dict under the reference's key names
  <case>.io.safetensors        x (input) and y (the reference module's output, eval mode)
Weights, BN statistics and inputs are random (seeded), so that every term matters.

  /usr/bin/python3 tests/interop/reference_attention.py --out DIR
"""
import argparse
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "io"))
from write_safetensors_reference import write  # noqa: E402


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """timm/layers/helpers.py."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class TimmSEModule(nn.Module):
    def __init__(self, channels, rd_ratio=1. / 16, rd_divisor=8):
        super().__init__()
        rd = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)

    def forward(self, x):
        s = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class TimmEcaModule(nn.Module):
    def __init__(self, channels, gamma=2, beta=1):
        super().__init__()
        t = int(abs(math.log(channels, 2) + beta) / gamma)
        k = max(t if t % 2 else t + 1, 3)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.conv(y).view(x.shape[0], -1, 1, 1)
        return x * torch.sigmoid(y)


class ConvNorm(nn.Module):
    """timm's ConvNormAct(2, 1, k, apply_act=False): conv (no bias) + BN, keys conv.conv, conv.bn."""

    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class TimmChannelAttn(nn.Module):
    def __init__(self, channels, rd_ratio=1. / 16, rd_divisor=1, mlp_bias=False):
        super().__init__()
        rd = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=mlp_bias)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=mlp_bias)

    def forward(self, x):
        a = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        m = self.fc2(F.relu(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * torch.sigmoid(a + m)


class TimmSpatialAttn(nn.Module):
    def __init__(self, k=7):
        super().__init__()
        self.conv = ConvNorm(2, 1, k)

    def forward(self, x):
        a = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(a))


class TimmCbamModule(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.channel = TimmChannelAttn(channels)
        self.spatial = TimmSpatialAttn(7)

    def forward(self, x):
        return self.spatial(self.channel(x))


class OfficialChannelGate(nn.Module):
    def __init__(self, channels, r=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, channels // r), nn.ReLU(),
                                 nn.Linear(channels // r, channels))

    def forward(self, x):
        hw = (x.size(2), x.size(3))
        att = self.mlp(F.avg_pool2d(x, hw, stride=hw)) + self.mlp(F.max_pool2d(x, hw, stride=hw))
        return x * torch.sigmoid(att).unsqueeze(2).unsqueeze(3)


class OfficialBasicConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x):
        return self.bn(self.conv(x))


class OfficialSpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = OfficialBasicConv()

    def forward(self, x):
        c = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
        return x * torch.sigmoid(self.spatial(c))


class OfficialCBAM(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.ChannelGate = OfficialChannelGate(channels)
        self.SpatialGate = OfficialSpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


class TimmNonLocalAttn(nn.Module):
    def __init__(self, channels, rd_ratio=1 / 8, rd_divisor=8):
        super().__init__()
        rd = make_divisible(channels * rd_ratio, divisor=rd_divisor)
        self.scale = channels ** -0.5
        self.t = nn.Conv2d(channels, rd, 1, bias=True)
        self.p = nn.Conv2d(channels, rd, 1, bias=True)
        self.g = nn.Conv2d(channels, rd, 1, bias=True)
        self.z = nn.Conv2d(rd, channels, 1, bias=True)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x):
        t, p, g = self.t(x), self.p(x), self.g(x)
        B, C, H, W = t.size()
        t = t.view(B, C, -1).permute(0, 2, 1)
        p = p.view(B, C, -1)
        g = g.view(B, C, -1).permute(0, 2, 1)
        att = F.softmax(torch.bmm(t, p) * self.scale, dim=2)
        y = torch.bmm(att, g).permute(0, 2, 1).reshape(B, C, H, W)
        return self.norm(self.z(y)) + x


# case name -> (module, input shape)
CASES = {
    "timm_se": (lambda: TimmSEModule(64), (2, 64, 7, 7)),
    "timm_eca": (lambda: TimmEcaModule(64), (2, 64, 7, 7)),
    "timm_cbam": (lambda: TimmCbamModule(64), (2, 64, 7, 7)),
    "official_cbam": (lambda: OfficialCBAM(64), (2, 64, 7, 7)),
    "timm_nl": (lambda: TimmNonLocalAttn(32), (2, 32, 6, 5)),
}


def randomise(module, gen):
    """Every parameter and BN statistic random and non-trivial (BN gammas away from 0)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.num_batches_tracked.fill_(7)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for i, (name, (make, shape)) in enumerate(sorted(CASES.items())):
        gen = torch.Generator().manual_seed(100 + i)
        module = make()
        randomise(module, gen)
        module.eval()
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            y = module(x)
        weights = [(k, v.contiguous()) for k, v in module.state_dict().items()]
        write(os.path.join(args.out, name + ".weights.safetensors"), weights, {"case": name})
        write(os.path.join(args.out, name + ".io.safetensors"), [("x", x), ("y", y)], {"case": name})
    print("wrote", len(CASES), "cases to", args.out)


if __name__ == "__main__":
    main()
