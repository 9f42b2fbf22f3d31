#!/usr/bin/env python3
"""Python oracle for tests/attention_channel/test_channel_attention_python.cpp.

Independent transcriptions, in plain PyTorch, of the public implementations that dynattn's
channel attention modules claim parity with, each under that implementation's own parameter
names:
  timm SEModule / EcaModule / CbamModule (timm/layers/squeeze_excite.py, eca.py, cbam.py),
  the official CBAM and BAM (github.com/Jongchan/attention-module, MODELS/cbam.py, bam.py).

  reference_channel_attention.py IN OUT

IN (safetensors, written by the C++ test) holds, for every case, "<case>/input" and the case's
state dict under dynattn's names ("<case>/<name>"); its metadata "cases" is a JSON object
{case: {"kind": ..., "channels": C, ...}}. This script maps the names onto the reference's,
loads them (strictly: shapes and key sets must match, so reduced widths and kernel sizes are
checked too), and writes to OUT "<case>/eval" (eval-mode output), "<case>/train" (train-mode
output from the same state) and "<case>/after/<name>" (every BN running statistic after that
train-mode forward, under dynattn's names).
"""
import importlib.util
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "safetensors_reference", os.path.join(_HERE, "..", "io", "write_safetensors_reference.py"))
st = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(st)


# ---- timm -------------------------------------------------------------------------------------
def timm_make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    min_value = min_value or divisor
    out = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < round_limit * v else out


def timm_gate(name):
    return {"sigmoid": torch.sigmoid, "hard_sigmoid": F.hardsigmoid}[name]


class TimmSE(nn.Module):
    def __init__(self, channels, gate="sigmoid", rd_channels=None):
        super().__init__()
        rd = rd_channels or timm_make_divisible(channels / 16, 8, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)
        self.gate = timm_gate(gate)

    def forward(self, x):
        s = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * self.gate(s)


class TimmECA(nn.Module):
    def __init__(self, channels, gamma=2, beta=1):
        super().__init__()
        t = int(abs(math.log(channels, 2) + beta) / gamma)
        k = max(t if t % 2 else t + 1, 3)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * torch.sigmoid(y).view(x.shape[0], -1, 1, 1)


class TimmConvBn(nn.Module):  # timm's ConvNormAct without the activation
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class TimmChannelAttn(nn.Module):
    def __init__(self, channels):
        super().__init__()
        rd = timm_make_divisible(channels / 16, 1, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=False)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=False)

    def forward(self, x):
        mlp = lambda v: self.fc2(F.relu(self.fc1(v)))
        return x * torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) +
                                 mlp(x.amax((2, 3), keepdim=True)))


class TimmSpatialAttn(nn.Module):
    def __init__(self, k=7):
        super().__init__()
        self.conv = TimmConvBn(2, 1, k)

    def forward(self, x):
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class TimmCBAM(nn.Module):
    def __init__(self, channels, kernel=7):
        super().__init__()
        self.channel = TimmChannelAttn(channels)
        self.spatial = TimmSpatialAttn(kernel)

    def forward(self, x):
        return self.spatial(self.channel(x))


# ---- official CBAM (Jongchan/attention-module) ------------------------------------------------
class OfficialChannelGate(nn.Module):
    def __init__(self, channels, r=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, channels // r), nn.ReLU(),
                                 nn.Linear(channels // r, channels))

    def forward(self, x):
        hw = (x.size(2), x.size(3))
        att = self.mlp(F.avg_pool2d(x, hw, stride=hw)) + self.mlp(F.max_pool2d(x, hw, stride=hw))
        return x * torch.sigmoid(att).unsqueeze(2).unsqueeze(3)


class OfficialBasicConv(nn.Module):  # conv (no bias) + BN(momentum 0.01), no ReLU
    def __init__(self, k):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, k, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x):
        return self.bn(self.conv(x))


class OfficialSpatialGate(nn.Module):
    def __init__(self, k=7):
        super().__init__()
        self.spatial = OfficialBasicConv(k)

    def forward(self, x):
        pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), 1)
        return x * torch.sigmoid(self.spatial(pooled))


class OfficialCBAM(nn.Module):
    def __init__(self, channels, r=16):
        super().__init__()
        self.ChannelGate = OfficialChannelGate(channels, r)
        self.SpatialGate = OfficialSpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


# ---- official BAM ---------------------------------------------------------------------------
class OfficialBAMChannelGate(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", nn.Flatten())
        self.gate_c.add_module("gate_c_fc_0", nn.Linear(c, c // r))
        self.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(c // r))
        self.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(c // r, c))

    def forward(self, x):
        pooled = F.avg_pool2d(x, x.size(2), stride=x.size(2))
        return self.gate_c(pooled).unsqueeze(2).unsqueeze(3).expand_as(x)


class OfficialBAMSpatialGate(nn.Module):
    def __init__(self, c, r=16, dilation=4):
        super().__init__()
        rd = c // r
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(c, rd, 1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(rd))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(2):
            self.gate_s.add_module(f"gate_s_conv_di_{i}",
                                   nn.Conv2d(rd, rd, 3, padding=dilation, dilation=dilation))
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(rd))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(rd, 1, 1))

    def forward(self, x):
        return self.gate_s(x).expand_as(x)


class OfficialBAM(nn.Module):
    def __init__(self, c, r=16, product=True):
        super().__init__()
        self.product = product  # the official code multiplies; the paper adds
        self.channel_att = OfficialBAMChannelGate(c, r)
        self.spatial_att = OfficialBAMSpatialGate(c, r)

    def forward(self, x):
        mc, ms = self.channel_att(x), self.spatial_att(x)
        return (1 + torch.sigmoid(mc * ms if self.product else mc + ms)) * x


# ---- cases --------------------------------------------------------------------------------------
def identity(name):
    return name


def official_cbam_name(name):
    return {"channel.fc1.weight": "ChannelGate.mlp.1.weight",
            "channel.fc1.bias": "ChannelGate.mlp.1.bias",
            "channel.fc2.weight": "ChannelGate.mlp.3.weight",
            "channel.fc2.bias": "ChannelGate.mlp.3.bias"}.get(
                name, name.replace("spatial.", "SpatialGate.spatial.", 1))


def timm_cbam_name(name):
    return name.replace("spatial.conv.", "spatial.conv.conv.").replace("spatial.bn.",
                                                                      "spatial.conv.bn.")


def build(case):
    kind, c = case["kind"], case["channels"]
    if kind == "timm_se":
        return TimmSE(c, case.get("gate", "sigmoid"), case.get("rd")), identity
    if kind == "timm_eca":
        return TimmECA(c), identity
    if kind == "timm_cbam":
        return TimmCBAM(c), timm_cbam_name
    if kind == "official_cbam":
        return OfficialCBAM(c), official_cbam_name
    if kind == "official_bam":
        return OfficialBAM(c, product=case["product"]), identity
    raise ValueError(f"unknown kind {kind}")


def main():
    src, dst = sys.argv[1], sys.argv[2]
    tensors, metadata = st.read(src)
    tensors = dict(tensors)
    out = []
    for name, case in json.loads(metadata["cases"]).items():
        module, rename = build(case)
        ours = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + "/")}
        x = ours.pop("input")
        ref_state = module.state_dict()
        state = {}
        for k, v in ours.items():
            ref_key = rename(k)
            assert ref_key in ref_state, f"{name}: {k} -> {ref_key} not in {sorted(ref_state)}"
            state[ref_key] = v.reshape(ref_state[ref_key].shape)
        module.load_state_dict(state, strict=True)
        with torch.no_grad():
            module.eval()
            out.append((f"{name}/eval", module(x).contiguous()))
            module.train()
            out.append((f"{name}/train", module(x).contiguous()))
        after = module.state_dict()
        for k in ours:
            if k.endswith("running_mean") or k.endswith("running_var"):
                out.append((f"{name}/after/{k}", after[rename(k)].contiguous()))
    st.write(dst, out, {"producer": "reference_channel_attention.py"})


if __name__ == "__main__":
    main()
