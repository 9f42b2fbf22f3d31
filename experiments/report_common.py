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


def cpu_name():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def batch(bench, b):
    """The entry for batch size `b` in a `dynattn bench --json` result."""
    return next(x for x in bench["batches"] if x["batch"] == b)
