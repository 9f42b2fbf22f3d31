"""docs/results/kernels.{md,json} from the runs of experiments/kernels."""
import argparse
import glob
import json
import os
import subprocess

from report_common import load, cpu_name

TOLERANCE = 0.95  # dynattn's choice may be at most 5% slower than ATen's
REPVGG_TARGET = 1.8  # deployed RepVGG-A0 at batch 64 over its train form


def rows_of(runs, isa):
    """The kernel comparisons (one row per model, form, layout, batch) and the deployed speed-ups."""
    rows, rows_deployed = [], []
    for path in sorted(glob.glob(os.path.join(runs, isa, "*.json"))):
        j = load(path)
        if j is None:
            continue
        layout = "channels-last" if j["channels_last"] else "contiguous"
        forms = [("train form", j)]
        if "deployed" in j:
            forms.append(("deployed", j["deployed"]))
        for form, f in forms:
            if "kernels_speedup" not in f:
                continue
            for s in f["kernels_speedup"]:
                b = s["batch"]
                dyn = next(x for x in f["batches"] if x["batch"] == b)
                aten = next(x for x in f["aten_kernels"]["batches"] if x["batch"] == b)
                rows.append({
                    "model": j["model"], "form": form, "layout": layout, "batch": b,
                    "dynattn_ms": dyn["median_ms"], "aten_ms": aten["median_ms"],
                    "speedup": s["speedup"], "speedup_min": s["speedup_min"],
                    "speedup_max": s["speedup_max"], "speedup_of_min": s["speedup_of_min"],
                    "rounds": s["rounds"], "isa": isa,
                })
        if "deployed_speedup" in j:
            for s in j["deployed_speedup"]:
                rows_deployed.append({"model": j["model"], "layout": layout, "batch": s["batch"],
                                      "speedup": s["speedup"], "speedup_min": s["speedup_min"],
                                      "speedup_max": s["speedup_max"],
                                      "speedup_of_min": s["speedup_of_min"], "isa": isa})
    return rows, rows_deployed


def cpu_line(runs, isa):
    path = os.path.join(runs, isa, "kernels_list.txt")
    if not os.path.exists(path):
        return "unknown"
    with open(path) as f:
        first = f.readline().strip()
    return first[len("CPU: "):] if first.startswith("CPU: ") else first


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default="runs/kernels")
    p.add_argument("--docs", default="docs/results")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--min-time", type=float, default=2.5)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--bin", default="build/dynattn")
    a = p.parse_args()
    isas = [i for i in ("native", "avx2") if os.path.isdir(os.path.join(a.runs, i))]
    rows, rows_deployed = [], []
    for isa in isas:
        r, d = rows_of(a.runs, isa)
        rows += r
        rows_deployed += d
    slower = [r for r in rows if r["speedup"] < TOLERANCE]
    zoo = [line.split()[0] for line in subprocess.run(
        [a.bin, "--quiet", "zoo"], capture_output=True, text=True).stdout.splitlines()[1:]
        if line.strip() and not line.startswith(" ") and not line.startswith("attention")]
    measured = sorted({r["model"].split(":")[0] for r in rows})
    missing = [m for m in zoo if m not in measured]
    out = {"command": "experiments/kernels", "machine": cpu_name(), "threads": a.threads,
           "min_time": a.min_time, "rounds": a.rounds,
           "cpu": {isa: cpu_line(a.runs, isa) for isa in isas},
           "simulated": {"native": False, "avx2": True},
           "tolerance": TOLERANCE, "rows": rows, "deployed_speedups": rows_deployed,
           "slower_than_tolerance": len(slower), "models_not_measured": missing}
    with open(os.path.join(a.docs, "kernels.json"), "w") as f:
        json.dump(out, f, indent=1)

    md = []
    md.append("# Kernel dispatch: dynattn's choices against ATen's\n")
    md.append(f"Produced by `experiments/kernels` on {cpu_name()} ({os.cpu_count()} cores, "
              f"{a.threads} threads). `dynattn bench --compare-kernels --compare-deployed` times "
              "each model with `--kernels dynattn` and `--kernels aten` (and its deployed form "
              f"with both) in {a.rounds} alternating rounds of one process, {a.min_time} s per "
              "batch size shared among them. The speed-up is ATen's time over dynattn's: the "
              "median over rounds of the ratio of the two medians measured next to each other "
              "(a pair shares the machine's state of the moment); the spread is the lowest and "
              "highest round; \"fastest\" is the ratio of the two fastest single runs, which "
              "interference cannot make faster. This host is shared and drifts by 10-30% over "
              "seconds: read single rows with their spread.\n")
    for isa in isas:
        md.append(f"- `{isa}` rows: {cpu_line(a.runs, isa)}"
                  + (" (simulated: ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU)" if isa == "avx2" else
                     "") + "\n")
    if missing:
        md.append(f"\nNot measured in this run ({len(missing)} of {len(zoo)} zoo models): "
                  + ", ".join(missing) + ".\n")
    md.append(f"\nTarget: never slower than ATen by more than 5% (speed-up >= {TOLERANCE}). "
              f"Rows below it: **{len(slower)} of {len(rows)}**.\n")
    rep = [r for r in rows_deployed if r["model"] == "repvgg_a0" and r["batch"] == 64]
    if rep:
        md.append("\n## Deployed RepVGG-A0 over its train form, batch 64\n")
        md.append(f"Target >= {REPVGG_TARGET}x.\n\n| ISA | layout | speed-up | rounds | fastest |\n"
                  "|---|---|---|---|---|\n")
        for r in rep:
            md.append(f"| {r['isa']} | {r['layout']} | {r['speedup']:.2f}x | "
                      f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f} | "
                      f"{r['speedup_of_min']:.2f}x |\n")
    if slower:
        md.append("\n## Rows below the target\n\n| ISA | model | form | layout | batch | dynattn ms "
                  "| ATen ms | speed-up | rounds | fastest |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for r in sorted(slower, key=lambda r: r["speedup"]):
            md.append(f"| {r['isa']} | {r['model']} | {r['form']} | {r['layout']} | {r['batch']} | "
                      f"{r['dynattn_ms']:.3f} | {r['aten_ms']:.3f} | {r['speedup']:.2f}x | "
                      f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f} | "
                      f"{r['speedup_of_min']:.2f}x |\n")
    md.append("\n## Every row\n\n| ISA | model | form | layout | batch | dynattn ms | ATen ms | "
              "speed-up | rounds | fastest |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        md.append(f"| {r['isa']} | {r['model']} | {r['form']} | {r['layout']} | {r['batch']} | "
                  f"{r['dynattn_ms']:.3f} | {r['aten_ms']:.3f} | {r['speedup']:.2f}x | "
                  f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f} | {r['speedup_of_min']:.2f}x |\n")
    with open(os.path.join(a.docs, "kernels.md"), "w") as f:
        f.write("".join(md))
    print(f"kernels: {len(rows)} rows, {len(slower)} below {TOLERANCE}; wrote "
          f"{a.docs}/kernels.md and kernels.json")


if __name__ == "__main__":
    main()
