#!/usr/bin/python3
"""Reference RepVGG models exported for the weight-import tests (tests/interop/test_import.cpp).

Neither the authors' package (DingXiaoH/RepVGG) nor timm is installable here, so this file
re-implements the forward pass of both with their own parameter names:
  - the official repvgg.py: stage0..stage4, rbr_dense.{conv,bn}, rbr_1x1.{conv,bn}, rbr_identity,
    rbr_reparam (after switch_to_deploy), gap, linear; groups on layers 2, 4, 6, ... (1-based over
    the blocks of stages 1-4);
  - timm's ByobNet RepVGG: stem, stages.N.M, conv_kxk.{conv,bn}, conv_1x1.{conv,bn}, identity,
    head.fc; groups on every second block of a stage (block index 1, 3, ...).
The stem stride is 1 instead of 2 for 28x28 inputs, as in dynattn (strides 1,2,2,2,2).
For every case it writes <case>.weights.safetensors and <case>.io.safetensors (x, y) into --out.

  /usr/bin/python3 tests/interop/reference_repvgg.py --out DIR
"""
import argparse
import os

import torch
import torch.nn as nn

from reference_attention import randomise, write

A0 = dict(num_blocks=[2, 4, 14, 1], width_multiplier=[0.75, 0.75, 0.75, 2.5])
STRIDES = [1, 2, 2, 2, 2]


def conv_bn(cin, cout, k, stride, padding, groups):
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    m.add_module("bn", nn.BatchNorm2d(cout))
    return m


class OfficialBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.groups = groups
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return torch.relu(self.rbr_reparam(x))
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return torch.relu(self.rbr_dense(x) + self.rbr_1x1(x) + identity)

    # The official get_equivalent_kernel_bias / switch_to_deploy, written out.
    def _fuse(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, nn.Sequential):
            kernel, bn = branch.conv.weight, branch.bn
        else:
            cin = branch.num_features
            kernel = torch.zeros(cin, cin // self.groups, 3, 3)
            for i in range(cin):
                kernel[i, i % (cin // self.groups), 1, 1] = 1
            bn = branch
        std = (bn.running_var + bn.eps).sqrt()
        t = (bn.weight / std).reshape(-1, 1, 1, 1)
        return kernel * t, bn.bias - bn.running_mean * bn.weight / std

    def switch_to_deploy(self):
        k3, b3 = self._fuse(self.rbr_dense)
        k1, b1 = self._fuse(self.rbr_1x1)
        kid, bid = self._fuse(self.rbr_identity)
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1,
                                     groups=conv.groups, bias=True)
        self.rbr_reparam.weight.data = k3 + nn.functional.pad(k1, [1, 1, 1, 1]) + kid
        self.rbr_reparam.bias.data = b3 + b1 + bid
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            delattr(self, name)


class OfficialRepVGG(nn.Module):
    def __init__(self, num_blocks, width_multiplier, groups=1, in_channels=1, num_classes=10):
        super().__init__()
        g_map = {layer: groups for layer in range(2, 27, 2)} if groups > 1 else {}
        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = OfficialBlock(in_channels, self.in_planes, STRIDES[0], 1)
        self.cur_layer_idx = 1
        widths = [64, 128, 256, 512]
        for s in range(4):
            blocks = []
            for b in range(num_blocks[s]):
                planes = int(widths[s] * width_multiplier[s])
                blocks.append(OfficialBlock(self.in_planes, planes, STRIDES[s + 1] if b == 0 else 1,
                                            g_map.get(self.cur_layer_idx, 1)))
                self.in_planes = planes
                self.cur_layer_idx += 1
            setattr(self, "stage%d" % (s + 1), nn.ModuleList(blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.in_planes, num_classes)

    def forward(self, x):
        x = self.stage0(x)
        for s in range(1, 5):
            for block in getattr(self, "stage%d" % s):
                x = block(x)
        return self.linear(self.gap(x).flatten(1))

    def switch_to_deploy(self):
        for m in self.modules():
            if isinstance(m, OfficialBlock):
                m.switch_to_deploy()


class ConvNormAct(nn.Module):  # timm's ConvNormAct without the activation
    def __init__(self, cin, cout, k, stride, groups):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class TimmRepVggBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.conv_kxk = ConvNormAct(cin, cout, 3, stride, groups)
        self.conv_1x1 = ConvNormAct(cin, cout, 1, stride, groups)

    def forward(self, x):
        y = self.conv_1x1(x) + self.conv_kxk(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


class Head(nn.Module):
    def __init__(self, cin, num_classes):
        super().__init__()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class TimmRepVGG(nn.Module):
    def __init__(self, num_blocks, width_multiplier, groups=1, in_channels=1, num_classes=10):
        super().__init__()
        stem = min(64, int(64 * width_multiplier[0]))
        self.stem = TimmRepVggBlock(in_channels, stem, STRIDES[0], 1)
        prev, stages = stem, []
        for s, (d, c) in enumerate(zip(num_blocks, [64, 128, 256, 512])):
            out = int(c * width_multiplier[s])
            blocks = []
            for b in range(d):
                g = groups if groups > 1 and (b + 1) % 2 == 0 else 1
                blocks.append(TimmRepVggBlock(prev, out, STRIDES[s + 1] if b == 0 else 1, g))
                prev = out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = Head(prev, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))



# case name -> (module factory, deploy after randomising?)
CASES = {
    "official_repvgg_a0": (lambda: OfficialRepVGG(**A0), False),
    "official_repvgg_a0g2_deployed": (lambda: OfficialRepVGG(**A0, groups=2), True),
    "timm_repvgg_a0g4": (lambda: TimmRepVGG(**A0, groups=4), False),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_grad_enabled(False)
    for i, (name, (make, deploy)) in enumerate(sorted(CASES.items())):
        gen = torch.Generator().manual_seed(200 + i)
        model = make()
        randomise(model, gen)
        # Small conv weights keep activations moderate through 22 layers (outputs ~10-100).
        for p in model.parameters():
            if p.dim() == 4:
                p.mul_(0.25 / (p[0].numel() ** 0.5) / 0.3)
        model.eval()
        if deploy:
            model.switch_to_deploy()
        x = torch.randn((2, 1, 28, 28), generator=gen)
        y = model(x)
        weights = [(k, v.contiguous()) for k, v in model.state_dict().items()]
        write(os.path.join(args.out, name + ".weights.safetensors"), weights, {"case": name})
        write(os.path.join(args.out, name + ".io.safetensors"), [("x", x), ("y", y)], {"case": name})
    print("wrote", len(CASES), "cases to", args.out)


if __name__ == "__main__":
    main()
