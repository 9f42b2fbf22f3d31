#!/usr/bin/python3
"""Reference attention modules exported for the weight-import tests (tests/interop/test_import.cpp).

The public packages (timm, the CBAM authors' code) are not installable here; the module tests
re-implement the forward pass of each reference module with the same parameter names (timm's
SEModule, EcaModule, CbamModule, NonLocalAttn; CBAM from Jongchan/attention-module), and this
script exports them with random weights. For every case it writes, into --out DIR:
  <case>.weights.safetensors   the module's state_dict under the reference's key names
  <case>.io.safetensors        x (input) and y (the reference module's output, eval mode)
Weights, BN statistics and inputs are random (seeded), so that every term matters.

  /usr/bin/python3 tests/interop/reference_attention.py --out DIR
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
for sub in ("io", "attention_channel", "attention_nonlocal"):
    sys.path.insert(0, os.path.join(HERE, "..", sub))
# The reference modules are those the module tests already use; this file only exports them.
from make_timm_fixture import NonLocalAttn  # noqa: E402
from reference_channel_attention import OfficialCBAM, TimmCBAM, TimmECA, TimmSE  # noqa: E402
from write_safetensors_reference import write  # noqa: E402


# case name -> (module, input shape)
CASES = {
    "timm_se": (lambda: TimmSE(64), (2, 64, 7, 7)),
    "timm_eca": (lambda: TimmECA(64), (2, 64, 7, 7)),
    "timm_cbam": (lambda: TimmCBAM(64), (2, 64, 7, 7)),
    "official_cbam": (lambda: OfficialCBAM(64), (2, 64, 7, 7)),
    "timm_nl": (lambda: NonLocalAttn(32), (2, 32, 6, 5)),
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
