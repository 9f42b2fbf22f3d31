#!/usr/bin/python3
"""Writes docs/results/dynamic_sd.{md,json} from what experiments/stochastic_depth produced.
Every number is read from those files (or, for the expected fraction of blocks executed,
computed from the model spec); nothing is typed in by hand."""
import argparse
import glob
import json
import os
import statistics

from report_common import load, cpu_name


def spec_options(spec):
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        opts[k] = v
    return name, opts


def resnet_blocks(name):
    depth = int("".join(c for c in name.split("resnet")[-1] if c.isdigit()))
    return 3 * ((depth - 2) // 6)


def survival(schedule, blocks, p_last):
    """include/dynattn/dynamic/stochastic_depth.h, survival_schedule()."""
    if schedule == "linear":
        return [1 - (l / blocks) * (1 - p_last) for l in range(1, blocks + 1)]
    if schedule == "uniform":
        return [p_last] * blocks
    if schedule == "timm":
        return [1.0] if blocks == 1 else [1 - (1 - p_last) * i / (blocks - 1) for i in range(blocks)]
    return [1.0] * blocks


def describe(spec):
    name, o = spec_options(spec)
    schedule = o.get("sd", "none")
    if schedule == "none":
        return {"semantics": "none", "expected_blocks_executed": 1.0}
    mode = o.get("sd_mode", "batch")
    p = survival(schedule, resnet_blocks(name), float(o.get("sd_p", "0.5")))
    test = o.get("sd_test", "auto")
    if test == "auto":
        test = "scale" if mode == "batch" else "identity"
    return {"semantics": ("per-mini-batch gate (paper)" if mode == "batch" else "per-sample drop path (timm)"),
            "schedule": schedule, "p_last": float(o.get("sd_p", "0.5")),
            "execution": o.get("sd_exec", "mask") if mode == "sample" else "skip (per batch)",
            "test_time": test, "expected_blocks_executed": sum(p) / len(p)}


def mean_sd(values):
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(m, s, scale=1.0, digits=2):
    if m is None:
        return "-"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--variants", nargs="+", required=True, help="name=spec pairs")
    ap.add_argument("--seeds", nargs="+", required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--speed-batches", type=int, default=0)
    ap.add_argument("--speed-threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    rows = []
    for variant in a.variants:
        name, _, spec = variant.partition("=")
        runs = []
        for seed in a.seeds:
            d = os.path.join(a.run, name, f"seed{seed}")
            ckpt = load(os.path.join(d, "checkpoint.json"))
            if not ckpt:
                continue
            test = load(os.path.join(d, "test.json"))
            ev = load(os.path.join(d, "eval.json"))
            accuracy = test["test_accuracy"] if test else (ev["accuracy"] if ev else None)
            history = ckpt.get("history", [])
            dep = load(os.path.join(d, "deploy.json"))
            evd = load(os.path.join(d, "eval_deployed.json"))
            runs.append({"seed": int(seed), "epochs": ckpt["epoch"], "accuracy": accuracy,
                         "epoch_seconds": [h["seconds"] for h in history],
                         "train_images_per_sec": [h["train_images_per_sec"] for h in history],
                         "final_train_loss": history[-1]["train_loss"] if history else None,
                         "deployed_spec": dep["model"] if dep else None,
                         "deploy_max_abs_diff": dep["max_abs_diff"] if dep else None,
                         "deploy_output_scale": dep["output_scale"] if dep else None,
                         "deployed_accuracy": evd["accuracy"] if evd else None})
        acc = [r["accuracy"] for r in runs if r["accuracy"] is not None]
        sec = [s for r in runs for s in r["epoch_seconds"]]
        ips = [s for r in runs for s in r["train_images_per_sec"]]
        dacc = [r["deployed_accuracy"] for r in runs if r["deployed_accuracy"] is not None]
        row = {"name": name, "spec": spec, **describe(spec), "runs": runs, "seeds_done": len(runs)}
        row["accuracy_mean"], row["accuracy_sd"] = mean_sd(acc)
        row["epoch_seconds_mean"], row["epoch_seconds_sd"] = mean_sd(sec)
        row["train_images_per_sec_mean"], _ = mean_sd(ips)
        row["deployed_accuracy_mean"], row["deployed_accuracy_sd"] = mean_sd(dacc)
        # The speed stage: rounds of a few training batches per variant, run one after another.
        speed = []
        for r in sorted(glob.glob(os.path.join(a.run, "speed", name, "round*", "checkpoint.json"))):
            h = (load(r) or {}).get("history", [])
            if h:
                speed.append(h[0]["train_images_per_sec"])
        row["speed_images_per_sec"] = speed
        row["speed_images_per_sec_median"] = statistics.median(speed) if speed else None
        rows.append(row)

    sbase = next((r for r in rows if r["semantics"] == "none" and r["speed_images_per_sec_median"]), None)
    for r in rows:
        r["train_time_vs_plain"] = (sbase["speed_images_per_sec_median"] / r["speed_images_per_sec_median"]
                                    if sbase and r["speed_images_per_sec_median"] else None)

    machine = {"cpu": cpu_name(), "threads": a.threads, "parallel": a.parallel}
    command = "experiments/stochastic_depth"
    result = {"command": command, "recipe": a.recipe, "epochs": a.epochs, "seeds": [int(s) for s in a.seeds],
              "machine": machine, "variants": rows}
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=2)

    md = ["# Stochastic depth on Fashion-MNIST (B1)", "",
          f"Produced by `{command}` (report: `experiments/report_stochastic_depth.py`) on {machine['cpu']}, "
          f"{a.parallel} run(s) side by side with {max(1, a.threads // max(1, a.parallel))} thread(s) each. "
          f"Recipe: `{a.recipe}`, {a.epochs} epoch(s), seeds {' '.join(a.seeds)}. "
          "Accuracy is on the 10,000 test images (mean ± sd over seeds); the epoch time is the `seconds` of "
          "each epoch in the checkpoint history (training only: no validation split), mean ± sd over epochs "
          "and seeds, as each run happened: runs trained at different times beside different loads, so "
          "the column records the runs and compares nothing (the speed table below does).", "",
          "| variant | spec | semantics | expected blocks run | test accuracy % | epoch s (as trained) | deployed accuracy % |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        sem = r["semantics"] + (f", {r['execution']}" if r["semantics"] != "none" else "")
        md.append(f"| {r['name']} | `{r['spec']}` | {sem} | {r['expected_blocks_executed']:.3f} | "
                  f"{fmt(r['accuracy_mean'], r['accuracy_sd'], 100)} | "
                  f"{fmt(r['epoch_seconds_mean'], r['epoch_seconds_sd'], 1, 1)} | "
                  f"{fmt(r['deployed_accuracy_mean'], r['deployed_accuracy_sd'], 100)} |")
    plain = next((r for r in rows if r["semantics"] == "none" and r["accuracy_mean"] is not None), None)
    if plain:
        diffs = [f"{r['name']} {100 * (r['accuracy_mean'] - plain['accuracy_mean']):+.2f}" for r in rows
                 if r is not plain and r["accuracy_mean"] is not None]
        if diffs:
            md += ["", f"Test accuracy vs plain after {a.epochs} epoch(s), in points: {', '.join(diffs)}. The paper's "
                   "gain (below) comes from 500 epochs of training; these runs are far shorter, and there "
                   "stochastic depth does not help."]
    if any(r["speed_images_per_sec"] for r in rows):
        md += ["", f"Training speed measured side by side (`speed` stage: {len(rows[0]['speed_images_per_sec'])} "
               f"rounds; in each, every variant trains {a.speed_batches} batches in turn, one process at a "
               f"time with {a.speed_threads} thread(s); median over rounds). This is the figure to compare: the "
               "epoch times above depend on what else ran beside each run.", "",
               "| variant | training images/s (median) | per round | training time vs plain |", "|---|---|---|---|"]
        for r in rows:
            if r["speed_images_per_sec"]:
                vs = f"{r['train_time_vs_plain']:.2f}x" if r["train_time_vs_plain"] else "-"
                md.append(f"| {r['name']} | {r['speed_images_per_sec_median']:.0f} | "
                          f"{', '.join(f'{x:.0f}' for x in r['speed_images_per_sec'])} | {vs} |")
    md += ["", "Expected blocks run: the mean survival probability over the blocks (computed from the spec), "
           "the fraction of residual branches a training step executes on average. A per-mini-batch "
           "gate skips a dropped block's forward and backward; the per-sample drop path in `mask` mode "
           "computes every block for every sample (regularisation only), in `compact` mode only the kept "
           "rows.", "",
           "Deployed: `dynattn deploy` folds conv+BN and, for the paper's semantics, multiplies each "
           "block's last affine by p_l (test-time scaling into the weights); the deployed spec carries "
           "`sd_test=identity`."]
    deployed = [(r["name"], x) for r in rows for x in r["runs"] if x["deployed_spec"]]
    if deployed:
        md += ["", "| variant | seed | deployed spec | max abs output diff (output scale) |", "|---|---|---|---|"]
        for name, x in deployed:
            md.append(f"| {name} | {x['seed']} | `{x['deployed_spec']}` | "
                      f"{x['deploy_max_abs_diff']:.3g} ({x['deploy_output_scale']:.3g}) |")
    md += ["", "For reference, the paper (Huang et al., ECCV 2016) reports on CIFAR-10 with ResNet-110: "
           "test error 6.41% -> 5.25% and a training epoch of 75 s -> 60 s; those are the paper's numbers, "
           "not measured here."]
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {a.out}.md and {a.out}.json")


if __name__ == "__main__":
    main()
