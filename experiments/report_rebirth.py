#!/usr/bin/python3
"""Writes docs/results/rebirth.{md,json} from what experiments/rebirth produced.
Every number is read from those files; nothing is typed in by hand."""
import argparse
import json
import os
from report_common import load, cpu_name


STEPS = [("original", "trained"), ("folded", "BN folded"), ("merged", "merged (weights copied)"),
         ("relearned", "re-learned"), ("finetuned", "fine-tuned")]


def pct(v):
    return "n/a" if v is None else f"{100 * v:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--merges", nargs="+", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seed", required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--rebirth-args", required=True)
    ap.add_argument("--threads", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    train_dir = os.path.join(a.run, a.model, "seed" + a.seed)
    ckpt = load(os.path.join(train_dir, "checkpoint.json"))
    runs = {m: load(os.path.join(a.run, m, "rebirth.json")) for m in a.merges}
    done = {m: r for m, r in runs.items() if r}
    results = []
    for merge, r in done.items():
        cost = r["cost"]
        base = cost["folded"]
        merged = cost["merged"]
        results.append({
            "merge": merge, "model": r["model"], "test_images": r["test_images"],
            "accuracy": r["accuracy"], "steps": r["steps"], "relearn": r["relearn"],
            "finetune": {k: v for k, v in r["finetune"].items() if k != "history"},
            "cost": cost,
            # Ratios within one run: the three forms were measured in alternating rounds.
            "speedup_batch1_vs_folded": base["latency_ms_batch1"] / merged["latency_ms_batch1"],
            "speedup_batch64_vs_folded": merged["images_per_sec_batch64"] / base["images_per_sec_batch64"],
            "speedup_batch1_vs_original": cost["original"]["latency_ms_batch1"] / merged["latency_ms_batch1"],
            # Peak memory of the merged net as a fraction of the folded original's.
            "memory_fraction_batch1_of_folded": merged["peak_bytes_batch1"] / base["peak_bytes_batch1"],
            "memory_fraction_batch64_of_folded": merged["peak_bytes_batch64"] / base["peak_bytes_batch64"],
        })
    out = {"command": "experiments/rebirth", "machine": cpu_name(), "threads": a.threads,
           "model": a.model, "seed": a.seed, "epochs": a.epochs,
           "epochs_done": ckpt["epoch"] if ckpt else 0, "recipe": a.recipe,
           "rebirth_args": a.rebirth_args, "merges_missing": [m for m in a.merges if m not in done],
           "results": results}
    with open(a.out + ".json", "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")

    L = ["# DeepRebirth on Fashion-MNIST: merging pools and branches of an Inception net\n",
         f"Produced by `experiments/rebirth` on {cpu_name()}, {a.threads} threads. "
         f"`{a.model}` is trained once ({out['epochs_done']} of {a.epochs} epochs, seed {a.seed}), "
         "then each merge starts from that checkpoint:\n",
         "```",
         f"dynattn train --model {a.model} {a.recipe} --seed {a.seed} --out RUN",
         f"dynattn rebirth --checkpoint RUN --merge MERGE --out DIR {a.rebirth_args}",
         "```\n"]
    if out["merges_missing"]:
        L.append("Not run yet: " + ", ".join(out["merges_missing"]) + ".\n")
    if not results:
        L.append("No results yet.")
    else:
        n = results[0]["test_images"]
        L += ["## Test accuracy after each step\n",
              f"On {n} test images. *BN folded* is exact (deploy()); *merged* has the exact parts "
              "copied and the merged layers initialised from the original kernels; *re-learned* "
              "after the stage-wise MSE re-learning; *fine-tuned* after cross-entropy training of "
              "the whole merged net.\n",
              "| merge | " + " | ".join(label for _, label in STEPS) + " | Δ final vs trained |",
              "|---|" + "---|" * (len(STEPS) + 1)]
        for r in results:
            acc = r["accuracy"]
            last = next((acc[k] for k in ("finetuned", "relearned") if k in acc), None)
            delta = "" if last is None else f"{100 * (last - acc['original']):+.2f}"
            L.append(f"| {r['merge']} | " + " | ".join(pct(acc.get(k)) for k, _ in STEPS) + f" | {delta} |")
        L.append("")
        L += ["## Cost before and after\n",
              "Measured by `dynattn rebirth` in the same process, the three forms in alternating "
              "rounds (`benchmark_models_alternating`), inference mode, channels-last; latency is "
              "the median at batch 1, throughput at batch 64. Peak memory: the highest sum of live "
              "CPU-allocator blocks during one forward pass (`measure_peak_memory`), weights "
              "excluded. Speed-ups and memory fractions compare with the BN-folded original of the same "
              "run (memory 0.50x: half the folded original's peak).\n",
              "| merge | form | parameters | MACs/image | max-pools | BN | latency b1 (ms) | "
              "b64 images/s | peak b1 (KiB) | peak b64 (MiB) | speed-up b1 | speed-up b64 | memory b1 | memory b64 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            base = r["cost"]["folded"]
            for form in ("original", "folded", "merged"):
                c = r["cost"][form]
                ratios = ["", "", "", ""]
                if form != "folded":
                    ratios = [f"{base['latency_ms_batch1'] / c['latency_ms_batch1']:.2f}x",
                              f"{c['images_per_sec_batch64'] / base['images_per_sec_batch64']:.2f}x",
                              f"{c['peak_bytes_batch1'] / base['peak_bytes_batch1']:.2f}x",
                              f"{c['peak_bytes_batch64'] / base['peak_bytes_batch64']:.2f}x"]
                L.append(f"| {r['merge']} | {form} | {c['parameters']:,} | {c['macs_per_image'] / 1e6:.2f} M | "
                         f"{c['layers']['max_pool']} | {c['layers']['batch_norm']} | {c['latency_ms_batch1']:.3f} | "
                         f"{c['images_per_sec_batch64']:.0f} | {c['peak_bytes_batch1'] / 1024:.1f} | "
                         f"{c['peak_bytes_batch64'] / 2**20:.2f} | " + " | ".join(ratios) + " |")
        L.append("")
        L += ["## What was merged, and how well re-learning matched the original\n",
              "Relative MSE = mean squared error of the merged stage against the original stage "
              "output, divided by the mean square of that output, on a fixed batch of training "
              "images, before and after re-learning.\n"]
        for r in results:
            L += [f"### merge={r['merge']} (`{r['model']}`)\n", "| stage | merge | kind |", "|---|---|---|"]
            for s in r["steps"]:
                L.append(f"| {s['stage']} | {s['layers']} | {'exact' if s['exact'] else 're-learned'} |")
            L += ["", "| stage | relative MSE before | after |", "|---|---|---|"]
            for s in r["relearn"]["stages"]:
                ms = s["target_mean_square"] or float("nan")
                L.append(f"| {s['stage']} | {s['mse_before'] / ms:.4f} | {s['mse_after'] / ms:.4f} |")
            L.append("")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
