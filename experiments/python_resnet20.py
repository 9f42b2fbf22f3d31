#!/usr/bin/python3
"""The same ResNet-20 (28x28, projection shortcuts) in Python PyTorch, timed the way
`dynattn bench` times ours, so experiments/baseline can report dynattn / Python ratios
measured side by side on one machine. Needs Debian's python3-torch.

Usage: /usr/bin/python3 experiments/python_resnet20.py --threads 2 --json out.json
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.downsample is None else self.downsample(x)
        return F.relu(out + sc)


class ResNet20(nn.Module):
    def __init__(self, depth=20, width=16, classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)

        def stage(cin, cout, stride):
            return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                   for i in range(n)])
        self.layer1 = stage(width, width, 1)
        self.layer2 = stage(width, 2 * width, 2)
        self.layer3 = stage(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def time_fn(fn, warmup, min_iters, min_seconds):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return {"median_ms": statistics.median(times),
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "iterations": len(times)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"torch_version": torch.__version__, "threads": torch.get_num_threads()}

    model = ResNet20().eval()
    for channels_last in (False, True):
        m = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        tag = "channels_last" if channels_last else "contiguous"
        for batch in (1, 64):
            x = torch.randn(batch, 1, 28, 28)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                t = time_fn(lambda: m(x), 10, 20, args.min_time)
            t["images_per_sec"] = batch / (t["median_ms"] / 1000.0)
            out[f"inference_b{batch}_{tag}"] = t

    for channels_last in (False, True):
        torch.manual_seed(0)
        m = ResNet20().train()
        x = torch.randn(128, 1, 28, 28)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,))
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

        def step():
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        t = time_fn(step, 2, 10, args.min_time)
        t["images_per_sec"] = 128 / (t["median_ms"] / 1000.0)
        out["train_b128_" + ("channels_last" if channels_last else "contiguous")] = t

    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
