"""Writes timm_non_local_fixture.safetensors for test_non_local.cpp (TimmParity).

A re-implementation of the forward of timm's NonLocalAttn (timm/layers/non_local_attn.py):
t, p, g: 1x1 convs C -> rd with bias, rd = make_divisible(C / 8, 8); softmax(t^T p / sqrt(C));
z: 1x1 conv rd -> C with bias; norm: BatchNorm2d; out = norm(z(y)) + x.
Weights, BN statistics and the input are random (seeded) under timm's key names, with the
outputs in eval mode (running statistics) and train mode (batch statistics).
Run with a Python that has torch:  /usr/bin/python3 make_timm_fixture.py
"""
import json
import os
import struct

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class NonLocalAttn(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        rd = make_divisible(in_channels / 8, divisor=8)
        self.scale = in_channels ** -0.5
        self.t = nn.Conv2d(in_channels, rd, 1, bias=True)
        self.p = nn.Conv2d(in_channels, rd, 1, bias=True)
        self.g = nn.Conv2d(in_channels, rd, 1, bias=True)
        self.z = nn.Conv2d(rd, in_channels, 1, bias=True)
        self.norm = nn.BatchNorm2d(in_channels)

    def forward(self, x):
        shortcut = x
        t, p, g = self.t(x), self.p(x), self.g(x)
        B, C, H, W = t.size()
        t = t.view(B, C, -1).permute(0, 2, 1)
        p = p.view(B, C, -1)
        g = g.view(B, C, -1).permute(0, 2, 1)
        att = F.softmax(torch.bmm(t, p) * self.scale, dim=2)
        y = torch.bmm(att, g).permute(0, 2, 1).reshape(B, C, H, W)
        return self.norm(self.z(y)) + shortcut


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().float().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def main():
    torch.manual_seed(7)
    channels = 16
    m = NonLocalAttn(channels)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        m.norm.running_mean.copy_(torch.randn(channels) * 0.1)
        m.norm.running_var.copy_(torch.rand(channels) + 0.5)
    x = torch.randn(2, channels, 5, 5)
    # Copies: the train-mode forward below updates the running statistics in place.
    tensors = {k: v.clone() for k, v in m.state_dict().items()
               if k != "norm.num_batches_tracked"}
    with torch.no_grad():
        m.eval()
        tensors["output_eval"] = m(x)
        m.train()
        tensors["output_train"] = m(x)
    tensors["input"] = x
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "timm_non_local_fixture.safetensors")
    write_safetensors(out, tensors)
    print(out, {k: list(v.shape) for k, v in tensors.items()})


if __name__ == "__main__":
    main()
