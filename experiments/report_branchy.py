#!/usr/bin/python3
"""Writes docs/results/dynamic_branchy.{md,json} and its PNG plots from what experiments/branchy
produced (calibrate_*.json, sweep_eval.json, sweep_bench_*.json). Every number is read from
those files; nothing is typed in by hand except the paper's figures, named as such."""
import argparse
import json
import os
import shutil
import subprocess

from report_common import cpu_name, load


def by_spec(runs):
    return {r["thresholds_spec"]: r for r in runs}


def timing(point, b):
    return next((x for x in point["batches"] if x["batch"] == b), None)


def gnuplot(script, out_png):
    """Runs gnuplot on `script`; returns the PNG's name, or None without gnuplot."""
    if not shutil.which("gnuplot"):
        return None
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
    return os.path.basename(out_png)


def plots(rows, out):
    """accuracy vs mean MACs, and measured speed-up vs MAC saving at batch 1 and 64."""
    data = out + "_curve.dat"
    with open(data, "w") as f:
        f.write("# macs_M accuracy_pct mac_saving speedup_b1 speedup_b64 stream_speedup_b64\n")
        for r in sorted(rows, key=lambda r: r["macs_mean"]):
            f.write(f"{r['macs_mean'] / 1e6:.4f} {100 * r['accuracy']:.3f} {r['mac_saving'] or 0:.4f} "
                    f"{r['speedup_b1'] or 0:.4f} {r['speedup_b64'] or 0:.4f} "
                    f"{r['stream_speedup_b64'] or 0:.4f}\n")
    pngs = []
    png = out + "_accuracy_macs.png"
    pngs.append(gnuplot(f"""set terminal pngcairo size 800,500 noenhanced
set output '{png}'
set title 'BranchyNet: test accuracy vs executed MACs per image (threshold sweep)'
set xlabel 'mean executed MACs per image (M)'
set ylabel 'test accuracy (%)'
set grid
plot '{data}' using 1:2 with linespoints pt 7 title 'compact, thresholds along the validation front'
""", png))
    png = out + "_speedup.png"
    pngs.append(gnuplot(f"""set terminal pngcairo size 800,500 noenhanced
set output '{png}'
set title 'BranchyNet: measured speed-up vs counted MAC saving (vs the last exit alone)'
set xlabel 'MAC saving (x)'
set ylabel 'measured speed-up (x)'
set grid
set key left top
plot '{data}' using 3:4 with linespoints pt 7 title 'batch 1', \\
     '{data}' using 3:5 with linespoints pt 5 title 'batch 64', \\
     '{data}' using 3:($6 > 0 ? $6 : 1/0) with linespoints pt 9 title 'batch 64, BranchyStream', \\
     x with lines dt 2 title 'speed-up = MAC saving'
""", png))
    os.remove(data)
    return [p for p in pngs if p]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--drop", type=float, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    ckpt = load(os.path.join(a.run, "checkpoint.json"))
    cal = {e: load(os.path.join(a.run, f"calibrate_{e}.json")) for e in ("compact", "mask")}
    ev = load(os.path.join(a.run, "sweep_eval.json"))
    bench = {e: load(os.path.join(a.run, f"sweep_bench_{e}.json")) for e in ("compact", "mask")}
    val_front = by_spec(cal["compact"]["front"]) if cal["compact"] else {}
    test_runs = by_spec(ev["branchy"]["runs"]) if ev else {}
    points = by_spec(bench["compact"]["points"]) if bench["compact"] else {}
    chosen = cal["compact"]["chosen"]["thresholds_spec"] if cal["compact"] else None

    rows = []
    for spec, t in test_runs.items():
        p = points.get(spec, {})
        b1, b64 = (timing(p, 1), timing(p, 64)) if p else (None, None)
        v = val_front.get(spec)
        rows.append({"thresholds": spec, "calibrated": spec == chosen,
                     "val_accuracy": v["accuracy"] if v else None,
                     "accuracy": t["accuracy"], "exit_histogram": t["exit_histogram"],
                     "macs_mean": t["macs_mean"], "macs_std": t["macs_std"],
                     "macs_min": t["macs_min"], "macs_max": t["macs_max"],
                     "mac_saving": p.get("mac_saving"),
                     "bench_accuracy": p.get("accuracy"),
                     "ms_b1": b1["dynamic_mean_ms"] if b1 else None,
                     "last_ms_b1": b1["last_exit_mean_ms"] if b1 else None,
                     "speedup_b1": b1["speedup"] if b1 else None,
                     "ratio_b1": b1["speedup_over_mac_saving"] if b1 else None,
                     "ips_b64": b64["dynamic_images_per_sec"] if b64 else None,
                     "last_ips_b64": b64["last_exit_images_per_sec"] if b64 else None,
                     "speedup_b64": b64["speedup"] if b64 else None,
                     "ratio_b64": b64["speedup_over_mac_saving"] if b64 else None,
                     "stream_ips_b64": b64.get("stream_images_per_sec") if b64 else None,
                     "stream_last_ips_b64": b64.get("stream_last_exit_images_per_sec") if b64 else None,
                     "stream_speedup_b64": b64.get("stream_speedup") if b64 else None,
                     "stream_ratio_b64": b64.get("stream_speedup_over_mac_saving") if b64 else None})
    rows.sort(key=lambda r: r["macs_mean"])
    last = next((r for r in rows if set(r["thresholds"].split("/")) == {"0"}), None)
    for r in rows:
        r["accuracy_drop_points"] = 100 * (last["accuracy"] - r["accuracy"]) if last else None

    mask_point = bench["mask"]["points"][0] if bench["mask"] else None
    machine = {"cpu": cpu_name(), "threads": a.threads}
    command = "experiments/branchy"
    pngs = plots(rows, a.out) if rows else []
    result = {"command": command, "model": a.model, "recipe": a.recipe, "epochs": a.epochs,
              "machine": machine, "max_accuracy_drop": a.drop,
              "trained_epochs": ckpt["epoch"] if ckpt else None,
              "exit_macs": ev["branchy"]["exit_macs"] if ev else None,
              "calibration": {e: ({k: v for k, v in c.items() if k != "front"} if c else None)
                              for e, c in cal.items()},
              "sweep": rows, "mask_mode_calibrated": mask_point, "plots": pngs}
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=2)

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    def num(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    md = ["# BranchyNet on Fashion-MNIST (B3)", "",
          f"Produced by `{command}` (report: `experiments/report_branchy.py`) on {machine['cpu']} with "
          f"{a.threads} thread(s). Model `{a.model}` (side exits after stages 1 and 2, conv3x3 + BN + ReLU "
          f"+ pool + FC heads, joint loss weights 1.0 / 0.3 / 0.3), recipe `{a.recipe}`, "
          f"{result['trained_epochs']} epoch(s). Thresholds are calibrated on the 10% validation split held "
          "out of the training set (never the test set); accuracies and MACs below are on the test set. "
          "Times are means per call over the first test images cycled in batches (`dynattn bench --images`), "
          "the dynamic model and the same network run to its last exit measured in alternating rounds in "
          "one process; speed-up = last-exit time / dynamic time, MAC saving = last-exit MACs / mean "
          "executed MACs (the exit heads included).", ""]
    if result["exit_macs"]:
        md.append("MACs per image when leaving at each exit: " +
                  ", ".join(f"exit {i}: {m / 1e6:.2f} M" for i, m in enumerate(result["exit_macs"])) + ".")
        md.append("")
    if cal["compact"]:
        c = cal["compact"]
        md.append(f"Calibration (`--max-accuracy-drop {a.drop}`): thresholds `{c['chosen']['thresholds_spec']}`, "
                  f"validation accuracy {pct(c['chosen']['accuracy'])}% vs {pct(c['last_exit']['accuracy'])}% at the "
                  f"last exit alone, {c['chosen']['mean_macs'] / 1e6:.2f} M vs {c['last_exit']['mean_macs'] / 1e6:.2f} M "
                  f"MACs per image, target {'met' if c['met'] else 'NOT met'} ({c['evaluated']} combinations tried).")
        md.append("")
    md += ["| thresholds | val acc % | test acc % | drop (points) | exits (histogram) | MACs/image M (std, min-max) | "
           "MAC saving | batch 1 ms (last exit) | speed-up b1 | ratio b1 | batch 64 images/s (last exit) | "
           "speed-up b64 | ratio b64 | stream b64 images/s (last exit) | speed-up | ratio |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"`{r['thresholds']}`" + (" (calibrated)" if r["calibrated"] else "")
        md.append(f"| {name} | {pct(r['val_accuracy'])} | {pct(r['accuracy'])} | {num(r['accuracy_drop_points'])} | "
                  f"{' / '.join(str(h) for h in r['exit_histogram'])} | "
                  f"{r['macs_mean'] / 1e6:.2f} ({r['macs_std'] / 1e6:.2f}, {r['macs_min'] / 1e6:.2f}-{r['macs_max'] / 1e6:.2f}) | "
                  f"{num(r['mac_saving'])}x | {num(r['ms_b1'], '{:.3f}')} ({num(r['last_ms_b1'], '{:.3f}')}) | "
                  f"{num(r['speedup_b1'])}x | {num(r['ratio_b1'])} | {num(r['ips_b64'], '{:.0f}')} "
                  f"({num(r['last_ips_b64'], '{:.0f}')}) | {num(r['speedup_b64'])}x | {num(r['ratio_b64'])} | "
                  f"{num(r['stream_ips_b64'], '{:.0f}')} ({num(r['stream_last_ips_b64'], '{:.0f}')}) | "
                  f"{num(r['stream_speedup_b64'])}x | {num(r['stream_ratio_b64'])} |")
    md += ["", "ratio = measured speed-up / counted MAC saving (1.0: the saved MACs turn fully into time). "
           "`0/0`: everyone runs to the last exit (the exit heads still run: their cost is the price of "
           "the decision); `inf/inf`: everyone leaves at the first exit. Batch 64: each batch of 64 on its "
           "own (compact mode: the few samples that go on past an exit run on as a small batch); stream: "
           "the same batches fed to a `BranchyStream` (`dynattn bench --stream`), whose queues behind the "
           "exits run once they hold 64 samples, timed over whole passes (flush included) against the "
           "last exit on the same batches."]
    first = next((r for r in rows if set(r["thresholds"].split("/")) == {"inf"} and r["mac_saving"]), None)
    if first and first["speedup_b1"] and first["speedup_b64"]:
        mac_share = 100 / first["mac_saving"]
        shares = {1: 100 / first["speedup_b1"], 64: 100 / first["speedup_b64"]}
        text = (f"Everyone leaving at the first exit (`inf/inf`): that path (stem, stage 1 and the first head) is "
                f"{mac_share:.0f}% of the last exit's MACs and {shares[1]:.0f}% of its time at batch 1, "
                f"{shares[64]:.0f}% at batch 64.")
        slower = [b for b, t in shares.items() if t > mac_share * 1.03]
        if slower:
            text += (f" Where the time share is the larger (batch {' and '.join(str(b) for b in slower)}), stage 1 "
                     "runs slower per MAC than the wider later stages: 16-channel 3x3 convolutions on 28x28 maps "
                     "move the most bytes per MAC in the network, so skipping the later stages saves fewer seconds "
                     "than MACs.")
        faster = [b for b, t in shares.items() if t < mac_share * 0.97]
        if faster:
            text += (f" Where it is the smaller (batch {' and '.join(str(b) for b in faster)}), the later stages "
                     "are the slower per MAC: their 7x7 and 14x14 maps give each operator little work, and "
                     "per-operator costs weigh more.")
        md += ["", text + " With mixed exits, per batch, the few samples that go on past an exit run the rest "
               "as a small batch, where per-operator costs dominate; the stream removes that part."]
    cal_row = next((r for r in rows if r["calibrated"]), None)
    if cal_row:
        md += ["", f"At the calibrated thresholds: test accuracy drop {num(cal_row['accuracy_drop_points'])} points "
               f"(target <= {a.drop} on the validation split, where it was calibrated), measured speed-up at batch 64 "
               f"{num(cal_row['speedup_b64'])}x per batch and {num(cal_row['stream_speedup_b64'])}x streamed "
               f"(target >= 2x), ratio to the MAC saving {num(cal_row['ratio_b64'])} and "
               f"{num(cal_row['stream_ratio_b64'])} (target >= 0.8); batch 1: {num(cal_row['speedup_b1'])}x, "
               f"ratio {num(cal_row['ratio_b1'])}."]
    if mask_point:
        b = {x["batch"]: x for x in mask_point["batches"]}
        md += ["", f"Mask mode at the calibrated thresholds (every exit computed for every row, then selected; "
               f"the equivalence reference): accuracy {pct(mask_point['accuracy'])}%, "
               f"{mask_point['macs_mean'] / 1e6:.2f} M MACs per image computed; speed-up vs the last exit " +
               ", ".join(f"batch {k}: {v['speedup']:.2f}x" for k, v in sorted(b.items())) + "."]
    for png in pngs:
        md += ["", f"![{png}]({png})"]
    md += ["", "The paper (Teerapittayanon et al., ICPR 2016, CPU, batch 1) reports B-ResNet-110 on CIFAR-10 "
           "1.9x faster than ResNet-110 at about equal accuracy (B-LeNet on MNIST 5.4x, B-AlexNet on CIFAR-10 "
           "1.5x); its timer excludes the branch heads, ours includes them. Those are the paper's numbers, "
           "not measured here; compare with the batch-1 speed-up of the calibrated row above."]
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {a.out}.md and {a.out}.json" + (f" and {', '.join(pngs)}" if pngs else ""))


if __name__ == "__main__":
    main()
