#!/usr/bin/python3
"""Writes docs/results/attention.{md,json} from what experiments/attention produced.
Every number is read from those files; nothing is typed in by hand."""
import argparse
import json
import os
import re
import statistics
from report_common import load, cpu_name, batch


def measured(micro):
    """name -> benchmark entry: the median of the repetitions where the run has them (the host is
    shared and noisy), else the single run (and the entries of benchmarks that reported an error)."""
    runs = {b["name"]: b for b in micro["benchmarks"] if b.get("run_type", "iteration") == "iteration"}
    for b in micro["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") == "median":
            runs[b["run_name"]] = b
    return runs


def passes_text(passes):
    """A pass count as written in the table: 2, 4.53."""
    return f"{passes:.2f}".rstrip("0").rstrip(".")


def micro_table(micro):
    """Per-module time over the same-shaped reference block, from the Google Benchmark JSON, with
    the overhead rule: time / reference <= 1.5 x (MACs / reference MACs + memory passes x one
    pass's time / reference time), the counters coming from the benchmarks themselves."""
    if not micro:
        return []
    runs = measured(micro)
    t = {name: b["real_time"] for name, b in runs.items()}
    rows = []

    def rule(row, name, ref_name, pass_name):
        m, r, p = runs.get(name, {}), runs.get(ref_name, {}), runs.get(pass_name)
        if "macs_per_image" in m and r.get("macs_per_image") and p:
            row["mac_ratio"] = m["macs_per_image"] / r["macs_per_image"]
            row["passes"] = float(m.get("memory_passes", 0))
            row["pass_ratio"] = p["real_time"] / r["real_time"]
            row["budget"] = 1.5 * (row["mac_ratio"] + row["passes"] * row["pass_ratio"])
            row["within"] = row["ratio"] <= row["budget"]
        return row

    shapes = {0: "C=16, 28x28", 1: "C=32, 14x14", 2: "C=64, 7x7"}
    pat = re.compile(r"BM_Attention(Forward|ForwardBackward)/(\w+)/shape:(\d)/N:(\d+)/cl:(\d)/real_time")
    for name, value in t.items():
        m = pat.fullmatch(name)
        if not m or m.group(2) in ("block", "pass"):
            continue
        ref_name = name.replace("/" + m.group(2) + "/", "/block/")
        ref = t.get(ref_name)
        if runs[name].get("error_occurred"):
            # A case the module cannot run (BAM's BatchNorm1d on a batch of 1 in training) is
            # listed with the benchmark's own reason rather than as a time.
            rows.append({"module": m.group(2), "pass": "forward" if m.group(1) == "Forward" else "forward+backward",
                         "shape": shapes[int(m.group(3))], "batch": int(m.group(4)),
                         "channels_last": m.group(5) == "1", "error": runs[name].get("error_message", "failed"),
                         "reference": "BasicBlock of the same shape"})
        elif ref:
            rows.append(rule({"module": m.group(2), "pass": "forward" if m.group(1) == "Forward" else "forward+backward",
                              "shape": shapes[int(m.group(3))], "batch": int(m.group(4)),
                              "channels_last": m.group(5) == "1", "ratio": value / ref,
                              "reference": "BasicBlock of the same shape"},
                             name, ref_name, name.replace("/" + m.group(2) + "/", "/pass/")))
    pat = re.compile(r"BM_NonLocal/C:(\d+)/HW:(\d+)/N:(\d+)/sub:(\d)/bwd:(\d)/real_time")
    shape_index = {("32", "14"): 1, ("64", "7"): 2}
    for name, value in t.items():
        m = pat.fullmatch(name)
        if not m:
            continue
        ref_name = f"BM_Conv3x3BN/C:{m.group(1)}/HW:{m.group(2)}/N:{m.group(3)}/sub:0/bwd:{m.group(5)}/real_time"
        ref = t.get(ref_name)
        idx = shape_index.get((m.group(1), m.group(2)))
        kind = "ForwardBackward" if m.group(5) == "1" else "Forward"
        pass_name = f"BM_Attention{kind}/pass/shape:{idx}/N:{m.group(3)}/cl:0/real_time"
        if ref:
            rows.append(rule({"module": "nl" + ("" if m.group(4) == "1" else " (no sub-sampling)"),
                              "pass": "forward+backward" if m.group(5) == "1" else "forward",
                              "shape": f"C={m.group(1)}, {m.group(2)}x{m.group(2)}", "batch": int(m.group(3)),
                              "channels_last": False, "ratio": value / ref,
                              "reference": "one 3x3 conv + BN of the same shape"},
                             name, ref_name, pass_name))
    for name, value in t.items():
        m = re.fullmatch(r"BM_BilinearHead(Forward|ForwardBackward)/(\w+)/real_time", name)
        if not m or m.group(2) == "avg_pool":
            continue
        r = t.get(f"BM_BilinearHead{m.group(1)}/avg_pool/real_time")
        if r:
            rows.append({"module": "head " + m.group(2), "pass": "forward" if m.group(1) == "Forward" else "forward+backward",
                         "shape": "C=64, 7x7", "batch": 64, "channels_last": False, "ratio": value / r,
                         "reference": "avg-pool + Linear head"})
    # `<kind>_aten` times the module with the fused inference kernels switched off (ATen's operators,
    # as in training): shown beside the default path, not judged on their own.
    key = lambda r: (r["pass"], r["shape"], r["batch"], r["channels_last"])
    aten = {(r["module"][:-len("_aten")],) + key(r): r["ratio"] for r in rows if r["module"].endswith("_aten")}
    rows = [r for r in rows if not r["module"].endswith("_aten")]
    for r in rows:
        if (r["module"],) + key(r) in aten:
            r["aten_ratio"] = aten[(r["module"],) + key(r)]
    return sorted(rows, key=lambda r: (r["module"], r["pass"], r["shape"], r["batch"], r["channels_last"]))


def op_table(micro):
    """The ops of the non-local block's paths next to the ATen form they replace, same run:
    BM_SoftmaxAttention, BM_PointwiseConv, BM_BatchNormAdd (dynattn:1 vs dynattn:0)."""
    if not micro:
        return []
    t = measured(micro)
    kinds = [
        (re.compile(r"BM_SoftmaxAttention/D:(\d+)/Q:(\d+)/K:(\d+)/N:(\d+)/bwd:(\d)/dynattn:1/real_time"),
         lambda m: ("g softmax(theta^T phi)^T", f"D={m[1]}, Q={m[2]}, K={m[3]}", m[4], m[5] == "1")),
        (re.compile(r"BM_PointwiseConv/Cin:(\d+)/Cout:(\d+)/HW:(\d+)/N:(\d+)/bwd:(\d)/dynattn:1/real_time"),
         lambda m: ("1x1 conv + bias", f"{m[1]} -> {m[2]}, {m[3]}x{m[3]}", m[4], m[5] == "1")),
        (re.compile(r"BM_BatchNormAdd/C:(\d+)/HW:(\d+)/N:(\d+)/dynattn:1/real_time"),
         lambda m: ("training BN + residual add", f"C={m[1]}, {m[2]}x{m[2]}", m[3], True)),
    ]
    rows = []
    for name, b in t.items():
        for pat, describe in kinds:
            m = pat.fullmatch(name)
            aten = t.get(name.replace("/dynattn:1/", "/dynattn:0/"))
            if not m or not aten or b.get("error_occurred") or aten.get("error_occurred"):
                continue
            op, shape, n, backward = describe(m)
            rows.append({"op": op, "shape": shape, "N": int(n),
                         "pass": "forward+backward" if backward else "forward",
                         "aten_ms": aten["real_time"] / 1e3, "op_ms": b["real_time"] / 1e3})
    return sorted(rows, key=lambda r: (r["op"], r["shape"], r["pass"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    zoo = load(os.path.join(a.run, "zoo.json"))
    zoo_by = {m["name"]: m for m in (zoo["models"] if isinstance(zoo, dict) else zoo or [])}
    base = a.models[0]
    results = []
    for model in a.models:
        accs, rates = [], []
        for seed in a.seeds:
            d = os.path.join(a.run, model, "seed" + seed)
            ev, ck = load(os.path.join(d, "eval.json")), load(os.path.join(d, "checkpoint.json"))
            if ev and ck and ck["epoch"] >= a.epochs:
                accs.append(ev["accuracy"])
                rates.append(statistics.mean(h["train_images_per_sec"] for h in ck["history"]))
        bench = load(os.path.join(a.run, model, "bench.json"))
        z = zoo_by.get(model, {})
        results.append({
            "model": model, "seeds_done": len(accs), "accuracies": accs,
            "mean": statistics.mean(accs) if accs else None,
            "std": statistics.stdev(accs) if len(accs) > 1 else None,
            "train_images_per_sec": statistics.mean(rates) if rates else None,
            "parameters": z.get("parameters"), "macs": z.get("macs_per_image"),
            "latency_b1_ms": batch(bench, 1)["median_ms"] if bench else None,
            "throughput_b64": batch(bench, 64)["images_per_sec"] if bench else None,
        })
    b = results[0]
    cost = []
    for depth in (20, 56):
        ref = zoo_by.get(f"resnet{depth}")
        for prefix in ("se", "eca", "cbam", "bam", "nl", "bcnn", "cbp"):
            m = zoo_by.get(f"{prefix}_resnet{depth}")
            if ref and m:
                cost.append({"model": m["name"], "params_overhead": m["parameters"] / ref["parameters"] - 1,
                             "macs_overhead": m["macs_per_image"] / ref["macs_per_image"] - 1})
    micro_json = load(os.path.join(a.run, "micro.json"))
    micro = micro_table(micro_json)
    products = op_table(micro_json)
    out = {"command": "experiments/attention", "machine": cpu_name(), "recipe": a.recipe,
           "epochs": a.epochs, "seeds": a.seeds, "results": results, "cost": cost, "micro": micro,
           "attention_product": products}
    with open(a.out + ".json", "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")

    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"
    L = ["# Attention I on Fashion-MNIST: what each module buys and costs\n",
         f"Produced by `experiments/attention` on {cpu_name()}. Every model is trained with the same "
         f"recipe and budget ({a.epochs} epochs, seeds {', '.join(a.seeds)}):\n",
         "```\ndynattn train --model MODEL " + a.recipe + " --seed SEED\n```\n",
         "## Accuracy, cost and speed\n",
         "Test accuracy over the seeds (mean ± sample std); speed measured by `dynattn bench "
         "--channels-last` for all models one after another in the same run; Δ is against " + base + ".\n",
         "| model | seeds | test acc. % | Δ acc. | parameters | MACs/image | latency b1 (ms) | b64 images/s | Δ MACs | Δ b1 time | Δ b64 time |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d_acc = "" if r["mean"] is None or b["mean"] is None or r is b else f"{100 * (r['mean'] - b['mean']):+.2f}"
        d_mac = "" if r is b or not r["macs"] or not b["macs"] else f"{100 * (r['macs'] / b['macs'] - 1):+.1f}%"
        d_b1 = "" if r is b or not r["latency_b1_ms"] or not b["latency_b1_ms"] else f"{100 * (r['latency_b1_ms'] / b['latency_b1_ms'] - 1):+.1f}%"
        d_b64 = "" if r is b or not r["throughput_b64"] or not b["throughput_b64"] else f"{100 * (b['throughput_b64'] / r['throughput_b64'] - 1):+.1f}%"
        acc = "n/a" if r["mean"] is None else pct(r["mean"]) + ("" if r["std"] is None else f" ± {100 * r['std']:.2f}")
        L.append(f"| {r['model']} | {r['seeds_done']} | {acc} | {d_acc} | {r['parameters'] or 'n/a':,} | "
                 f"{(r['macs'] or 0) / 1e6:.2f} M | {r['latency_b1_ms'] or float('nan'):.3f} | "
                 f"{r['throughput_b64'] or float('nan'):.0f} | {d_mac} | {d_b1} | {d_b64} |")
    L.append("")
    helped = [r for r in results[1:] if r["mean"] is not None and b["mean"] is not None and r["std"] is not None
              and b["std"] is not None and r["mean"] - b["mean"] > max(r["std"], b["std"])]
    not_helped = [r["model"] for r in results[1:] if r["mean"] is not None and r not in helped]
    if b["mean"] is not None:
        L.append("Plainly: " + (", ".join(r["model"] for r in helped) + " beat " + base +
                 " by more than one standard deviation" if helped else "no variant beats " + base +
                 " by more than one standard deviation at this budget") +
                 ("; " + ", ".join(not_helped) + " do not." if not_helped else "."))
        L.append("")
    L += ["## Cost overhead per module (counted, `dynattn zoo`)\n",
          "The SE paper reports about +0.26% FLOPs and +10% parameters on ResNet-50. On the narrow "
          "CIFAR-style ResNets here (16-64 channels, r = 16 gives 1-4 hidden units):\n",
          "| model | parameters | MACs |", "|---|---|---|"]
    for c in cost:
        L.append(f"| {c['model']} | {100 * c['params_overhead']:+.2f}% | {100 * c['macs_overhead']:+.3f}% |")
    L.append("")
    if micro:
        L += ["## Per-module time (Google Benchmark, one thread)\n",
              "`OMP_NUM_THREADS=1 build/bench/dynattn_bench --benchmark_filter='Attention|NonLocal|Conv3x3BN|BilinearHead|PointwiseConv|BatchNormAdd' "
              "--benchmark_min_time=0.1 --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true` "
              "(the micro stage of experiments/attention): "
              "each module's time as a multiple of a reference of the same shape measured in the same process, "
              "each time the median of five repetitions, those of all benchmarks run in random order so that a "
              "module and its reference sample the same stretch of time on this shared machine.\n",
              "The overhead rule of the issue: a module's time over its reference must stay within "
              "1.5 x (its MACs over the reference's + its memory passes over the C x H x W map x the time "
              "of one pass over the reference's). MACs are counted by the benchmarks; the passes of each "
              "module are listed in bench/bench_attention_channel.cpp and bench_attention_nonlocal.cpp; "
              "one pass is timed there as y = x * 1 on the same map.\n",
              "At inference (forward without autograd, CPU float) SE, ECA, CBAM and BAM run fused kernels "
              "(ops/fused_gates.h); the column *ATen path* is the same module with them switched off "
              "(`--kernels aten`), measured in the same process.\n",
              "| module | pass | shape | batch | layout | time / reference | ATen path | MACs / ref. | passes | budget | within | reference |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in micro:
            layout = "channels-last" if m["channels_last"] else "contiguous"
            rule = (f"{m['mac_ratio']:.3f} | {passes_text(m['passes'])} | {m['budget']:.2f} | {'yes' if m['within'] else '**no**'}"
                    if "budget" in m else " | | | ")
            if "error" in m:
                L.append(f"| {m['module']} | {m['pass']} | {m['shape']} | {m['batch']} | {layout} | "
                         f"not run: {m['error']} | | | | | | {m['reference']} |")
                continue
            L.append(f"| {m['module']} | {m['pass']} | {m['shape']} | {m['batch']} | {layout} | " + (
                     f"{m['ratio']:.2f} | {m['aten_ratio']:.2f}" if "aten_ratio" in m else f"{m['ratio']:.2f} | ") + f" | {rule} | {m['reference']} |")
        ruled = [m for m in micro if "within" in m]
        if ruled:
            bad = [m for m in ruled if not m["within"]]
            L.append("")
            L.append(f"{len(ruled) - len(bad)} of {len(ruled)} measured cases are within the budget" +
                     ("." if not bad else "; outside it: " + "; ".join(
                         f"{m['module']} {m['pass']} {m['shape']} N={m['batch']} "
                         f"{'channels-last' if m['channels_last'] else 'contiguous'} ({m['ratio']:.2f} vs {m['budget']:.2f})"
                         for m in bad) + "."))
        L.append("")
    if products:
        L += ["### The non-local block's ops vs the ATen form they replace\n",
              "Same run, one thread: `BM_SoftmaxAttention` (ops/softmax_attention.h against ATen's bmm, "
              "softmax, bmm), `BM_PointwiseConv` (ops/pointwise_conv.h against torch::conv2d), "
              "`BM_BatchNormAdd` (ops/batch_norm_add.h against torch::batch_norm + add). `nl` uses them "
              "on float CPU input (the kernel selection switch on).\n",
              "| op | shape | N | pass | ATen ms | dynattn ms | speed-up |", "|---|---|---|---|---|---|---|"]
        for r in products:
            L.append(f"| {r['op']} | {r['shape']} | {r['N']} | {r['pass']} | {r['aten_ms']:.3f} | "
                     f"{r['op_ms']:.3f} | {r['aten_ms'] / r['op_ms']:.2f}x |")
        L.append("")
    pngs = [p for p in ("cbam", "bam", "nl") if os.path.exists(os.path.join(os.path.dirname(a.out), f"attention_{p}.png"))]
    if pngs:
        L.append("## Attention pictures (`dynattn visualize --checkpoint RUN --out DIR`, seed 0)\n")
        for p in pngs:
            L.append(f"![{p}](attention_{p}.png)\n")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
