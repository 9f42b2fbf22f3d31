#!/usr/bin/python3
"""Writes docs/results/baseline.{md,json} from the files experiments/baseline produced.
Every number in the report is read from those files; nothing is typed in by hand."""
import argparse
import json
import os
import platform
import subprocess


def load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def batch(bench, b):
    return next(x for x in bench["batches"] if x["batch"] == b)


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--train-command", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    ev = load(os.path.join(a.run, "eval.json"))
    ckpt = load(os.path.join(a.run, "checkpoint.json"))
    cont = load(os.path.join(a.run, "bench_contiguous.json"))
    cl = load(os.path.join(a.run, "bench_channels_last.json"))
    py = load(os.path.join(a.run, "python.json"))
    py_same = load(os.path.join(a.run, "python_same_blas.json"))
    hist = ckpt["history"]
    train_rate = sum(h["train_images_per_sec"] for h in hist) / len(hist)
    train_minutes = sum(h["seconds"] for h in hist) / 60.0

    rows = []

    def ratio(ours, theirs, higher_is_better):
        if not theirs:
            return None
        return ours / theirs if higher_is_better else theirs / ours

    def add(what, ours, key, field, higher_is_better):
        def get(p):
            if not p:
                return None
            if key == "b1_best":
                return min(p["inference_b1_channels_last"]["median_ms"],
                           p["inference_b1_contiguous"]["median_ms"])
            return p[key][field]
        theirs, same = get(py), get(py_same)
        rows.append({"what": what, "dynattn": ours, "python": theirs,
                     "speedup": ratio(ours, theirs, higher_is_better),
                     "python_same_blas": same,
                     "speedup_same_blas": ratio(ours, same, higher_is_better)})

    add("inference batch 64, channels-last (images/s)", batch(cl, 64)["images_per_sec"],
        "inference_b64_channels_last", "images_per_sec", True)
    add("inference batch 64, contiguous (images/s)", batch(cont, 64)["images_per_sec"],
        "inference_b64_contiguous", "images_per_sec", True)
    best_b1 = min(batch(cl, 1)["median_ms"], batch(cont, 1)["median_ms"])
    add("latency batch 1, best layout (median ms)", best_b1, "b1_best", None, False)
    add("latency batch 1, contiguous (median ms)", batch(cont, 1)["median_ms"],
        "inference_b1_contiguous", "median_ms", False)
    add("training step batch 128, channels-last (images/s)", cl["train"]["images_per_sec"],
        "train_b128_channels_last", "images_per_sec", True)
    add("training step batch 128, contiguous (images/s)", cont["train"]["images_per_sec"],
        "train_b128_contiguous", "images_per_sec", True)

    result = {
        "command": "experiments/baseline" + ("" if a.epochs == 30 else f" (EPOCHS={a.epochs})"),
        "train_command": a.train_command,
        "machine": {"cpu": cpu_name(), "threads": cl["threads"]},
        "model": ckpt["model"],
        "epochs": ckpt["epoch"],
        "test_accuracy": ev["accuracy"],
        "per_class_accuracy": dict(zip(ev["classes"], ev["per_class_accuracy"])),
        "parameters": cl["parameters"],
        "macs_per_image": cl["macs_per_image"],
        "training_images_per_sec_epoch_average": train_rate,
        "training_minutes": train_minutes,
        "conv_peak_gflops": cl["conv_peak_gflops"],
        "bench_channels_last": cl,
        "bench_contiguous": cont,
        "python": py,
        "python_same_blas": py_same,
        "comparison": rows,
    }
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")

    L = []
    L.append("# Baseline: ResNet-20 on Fashion-MNIST\n")
    L.append("Produced by `" + result["command"] + "` on " + result["machine"]["cpu"] +
             f", {cl['threads']} threads, tuned malloc (see README). Training command:\n")
    L.append("```\n" + a.train_command + "\n```\n")
    L.append("## Accuracy and cost\n")
    L.append("| metric | value |\n|---|---|")
    L.append(f"| test accuracy | {100 * ev['accuracy']:.2f}% |")
    L.append(f"| epochs | {ckpt['epoch']} |")
    L.append(f"| parameters | {cl['parameters']:,} |")
    L.append(f"| MACs per 28x28 image | {cl['macs_per_image'] / 1e6:.2f} M |")
    L.append(f"| training throughput, epoch average from metrics.jsonl (incl. data pipeline; affected by any other load on the machine during training) | {train_rate:.0f} images/s |")
    L.append(f"| training step, batch 128, channels-last (benchmark, same run as the Python one) | {cl['train']['images_per_sec']:.0f} images/s |")
    L.append(f"| training time | {train_minutes:.1f} min |")
    L.append(f"| inference batch 64, channels-last | {batch(cl, 64)['images_per_sec']:.0f} images/s |")
    L.append(f"| latency batch 1 (median / p90), channels-last | {batch(cl, 1)['median_ms']:.3f} / {batch(cl, 1)['p90_ms']:.3f} ms |")
    L.append(f"| latency batch 1 (median / p90), contiguous | {batch(cont, 1)['median_ms']:.3f} / {batch(cont, 1)['p90_ms']:.3f} ms |")
    L.append(f"| achieved at batch 64 vs measured conv peak | {batch(cl, 64)['gflops']:.1f} of {cl['conv_peak_gflops']:.1f} GFLOP/s ({100 * batch(cl, 64)['gflops'] / cl['conv_peak_gflops']:.0f}%) |")
    L.append("")
    L.append("Per-class test accuracy: " + ", ".join(
        f"{c} {100 * v:.1f}%" for c, v in result["per_class_accuracy"].items()) + ".\n")
    L.append("## dynattn vs Python PyTorch, same model, same machine, same run\n")
    if py:
        core = cl.get("openblas_core") or "?"
        L.append(f"Python: PyTorch {py['torch_version']} (`experiments/python_resnet20.py`), "
                 f"{py['threads']} threads, same malloc settings. Speed-up > 1 means dynattn is faster. "
                 "\"Python\" is run as a user runs it: OpenBLAS chooses its own kernels. "
                 f"\"Python, same BLAS\" runs with OPENBLAS_CORETYPE={core}, the kernels dynattn "
                 "selected (see README), so that only the framework differs.\n")
        L.append("| measurement | dynattn | Python | speed-up | Python, same BLAS | speed-up |\n"
                 "|---|---|---|---|---|---|")
        fmt = lambda v, suffix="": "n/a" if v is None else f"{v:.2f}{suffix}"
        for r in rows:
            L.append(f"| {r['what']} | {r['dynattn']:.2f} | {fmt(r['python'])} | {fmt(r['speedup'], 'x')} "
                     f"| {fmt(r['python_same_blas'])} | {fmt(r['speedup_same_blas'], 'x')} |")
    else:
        L.append("python3-torch was not installed when this ran: no comparison.")
    L.append("")
    L.append("## Allocator policy\n")
    L.append("The same benchmark in a child process with glibc's default malloc settings "
             "(`dynattn bench --compare-malloc`):\n")
    L.append("| layout | batch | tuned (ms) | default (ms) |\n|---|---|---|---|")
    for name, bench in (("contiguous", cont), ("channels-last", cl)):
        other = bench.get("compare_malloc")
        if not other:
            continue
        for b in (1, 64):
            L.append(f"| {name} | {b} | {batch(bench, b)['median_ms']:.3f} | {batch(other, b)['median_ms']:.3f} |")
    L.append("")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))


if __name__ == "__main__":
    main()
