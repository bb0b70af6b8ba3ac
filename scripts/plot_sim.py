#!/usr/bin/env python3
"""Plots docs/autoscaling/sim.json (written by ember-sim): replicas and queue length over time,
Ember vs KEDA-like, one panel per scenario. Needs matplotlib (scripts/sim installs it)."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "docs/autoscaling/sim.json"
    out = sys.argv[2] if len(sys.argv) > 2 else "docs/autoscaling/sim.png"
    with open(path) as f:
        doc = json.load(f)
    scenarios = []
    for o in doc["outcomes"]:
        if o["scenario"] not in scenarios:
            scenarios.append(o["scenario"])
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(13, 3.2 * len(scenarios)), squeeze=False)
    colours = {"ember": "tab:red", "keda_like": "tab:blue"}
    for row, scenario in enumerate(scenarios):
        for o in doc["outcomes"]:
            if o["scenario"] != scenario:
                continue
            t = [s[0] for s in o["series"]]
            label = "Ember" if o["policy"] == "ember" else "KEDA-like (30 s poll, ready only, HPA 300 s)"
            axes[row][0].plot(t, [s[1] for s in o["series"]], color=colours[o["policy"]], label=label, lw=1)
            axes[row][1].plot(t, [s[2] for s in o["series"]], color=colours[o["policy"]], label=label, lw=1)
        axes[row][0].set_ylabel(f"{scenario}\nreplicas")
        axes[row][1].set_ylabel("queue length")
        axes[row][1].set_yscale("symlog")
    axes[0][0].legend(loc="upper right", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("simulated seconds")
    world = doc["world"]
    fig.suptitle(
        f"seed {world['seed']}, rate {world['rate']}/s, {world['service_rate']} jobs/s per replica, "
        f"model load {world['model_load_s']} s"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
