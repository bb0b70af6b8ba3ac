#!/usr/bin/env python3
"""Plots docs/autoscaling/sim.json (written by ember-sim): replicas and ready messages over time,
Ember vs KEDA (QueueLength over HTTP, and MessageRate) with the HPA, one row per scenario:
replicas and queue at each system's default windows, and replicas at equal (Ember's) windows.
Needs matplotlib (scripts/sim installs it)."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"ember": "tab:red", "keda_queue_length": "tab:blue", "keda_message_rate": "tab:green"}
LABELS = {
    "ember": "Ember (1 s tick, ready + in flight, rate + backlog)",
    "keda_queue_length": "KEDA QueueLength (ready + unacked) + HPA",
    "keda_message_rate": "KEDA MessageRate (publish rate) + HPA",
}


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "docs/autoscaling/sim.json"
    out = sys.argv[2] if len(sys.argv) > 2 else "docs/autoscaling/sim.png"
    with open(path) as f:
        doc = json.load(f)
    runs = [r for r in doc["runs"] if r["section"] == "windows"]
    scenarios = []
    for r in runs:
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
    panels = [
        ("defaults", "replicas", "replicas, each system's defaults"),
        ("defaults", "queue", "ready messages, each system's defaults"),
        ("ember_windows", "replicas", "replicas, everyone at Ember's windows (30 s / 60 s)"),
    ]
    fig, axes = plt.subplots(len(scenarios), len(panels), figsize=(17, 3.2 * len(scenarios)), squeeze=False)
    for row, scenario in enumerate(scenarios):
        for col, (windows, key, title) in enumerate(panels):
            ax = axes[row][col]
            for r in runs:
                if r["scenario"] != scenario or r["windows"] != windows:
                    continue
                series = r[key]
                ax.plot(range(len(series)), series, color=COLOURS[r["policy"]], label=LABELS[r["policy"]], lw=0.9)
            if key == "queue":
                ax.set_yscale("symlog")
            if row == 0:
                ax.set_title(title, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{scenario}\nreplicas")
    axes[0][0].legend(loc="lower right", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("simulated seconds")
    world = doc["world"]
    fig.suptitle(
        f"seed {world['seed']}, rate {world['rate']}/s, {world['service_rate']} jobs/s per replica, "
        f"model load {world['model_load_s']} s, drain limit {world['drain_limit_s']} s"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
