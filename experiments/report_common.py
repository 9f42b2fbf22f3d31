"""Helpers shared by the experiments' report scripts (report_*.py)."""
import json
import os
import subprocess


def load(path):
    """The JSON at `path`, or None when the file does not exist (a stage not run yet)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def cpu_isa():
    """The widest vector ISA of this CPU that dynattn's and oneDNN's kernels use, and the cap in
    force (ONEDNN_MAX_CPU_ISA), as the kernel dispatch (ops/dispatch.h) reads them."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "baseline x86-64"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return isa + (f", capped by ONEDNN_MAX_CPU_ISA={cap}" if cap else "")


def cpu_name():
    """The CPU's model name with its ISA: every speed figure depends on both."""
    name = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({cpu_isa()})"


def batch(bench, b):
    """The entry for batch size `b` in a `dynattn bench --json` result."""
    return next(x for x in bench["batches"] if x["batch"] == b)
