#!/usr/bin/env python3
"""docs/results/dynamic.{md,json}: the dynamic-execution results of issue 5 in one page, from the
reports of experiments/stochastic_depth (dynamic_sd) and experiments/branchy (dynamic_branchy),
with their targets. Run after either experiment:

    /usr/bin/python3 experiments/report_dynamic.py --docs docs/results
"""
import argparse
import json
import os

from report_common import load


def section(md_path):
    """The report's markdown with its headings one level down; None if it is missing."""
    if not os.path.exists(md_path):
        return None
    lines = open(md_path).read().rstrip().split("\n")
    return "\n".join("#" + l if l.startswith("#") else l for l in lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", default="docs/results")
    a = ap.parse_args()
    sd = load(os.path.join(a.docs, "dynamic_sd.json"))
    branchy = load(os.path.join(a.docs, "dynamic_branchy.json"))

    targets = []
    if branchy:
        cal = next((r for r in branchy.get("sweep", []) if r.get("calibrated")), None)
        if cal and cal.get("ratio_b64") is not None:
            targets.append({"target": "BranchyNet: measured speed-up / counted MAC saving at batch 64 >= 0.8",
                            "measured": f"{cal['ratio_b64']:.2f} (calibrated thresholds `{cal['thresholds']}`)",
                            "met": cal["ratio_b64"] >= 0.8})
        if cal and cal.get("speedup_b64") is not None:
            drop = cal.get("accuracy_drop_points")
            ok_drop = drop is not None and drop <= 0.5
            targets.append({"target": "BranchyNet-ResNet-56 at thresholds with accuracy drop <= 0.5 points: "
                                      "speed-up >= 2x at batch 64",
                            "measured": f"{cal['speedup_b64']:.2f}x, test accuracy drop "
                                        f"{'-' if drop is None else f'{drop:.2f}'} points",
                            "met": cal["speedup_b64"] >= 2.0 and ok_drop})
    if sd:
        plain = next((v for v in sd["variants"] if v.get("semantics") == "none"), None)
        for v in sd["variants"]:
            if v is plain or v.get("train_time_vs_plain") is None:
                continue
            targets.append({"target": f"stochastic depth `{v['name']}`: training time vs plain "
                                      "(paper: ~0.8 for per-mini-batch)",
                            "measured": f"{v['train_time_vs_plain']:.2f}x", "met": None})

    with open(os.path.join(a.docs, "dynamic.json"), "w") as f:
        json.dump({"targets": targets, "stochastic_depth": sd, "branchy": branchy}, f, indent=2)
        f.write("\n")

    md = ["# Dynamic execution: stochastic depth and BranchyNet", "",
          "Assembled by `experiments/report_dynamic.py` from the reports of `experiments/stochastic_depth` "
          "and `experiments/branchy` (each section names the command that made it).", ""]
    if targets:
        md += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        for t in targets:
            met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
            md.append(f"| {t['target']} | {t['measured']} | {met} |")
        md.append("")
    for name in ("dynamic_branchy", "dynamic_sd"):
        s = section(os.path.join(a.docs, name + ".md"))
        md += [s if s else f"## {name}\n\nNot run yet.", ""]
    with open(os.path.join(a.docs, "dynamic.md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {a.docs}/dynamic.md and dynamic.json")


if __name__ == "__main__":
    main()
