#!/usr/bin/env python3
"""Plots what scripts/gpu-check brought back (gpu.json, and cpu.json if there) to gpu.png beside it."""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

d = sys.argv[1]


def load(name):
    path = os.path.join(d, f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else None


runs = [(label, r) for label, r in (("GPU", load("gpu")), ("CPU", load("cpu"))) if r]
if not runs:
    sys.exit(f"no gpu.json or cpu.json in {d}")
gpu = load("gpu")
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
for label, r in runs:
    batches = [x["batch"] for x in r["resident"]]
    axes[0].plot(batches, [x["throughput_jobs_per_s"] for x in r["resident"]], "o-",
                 label=f"{label} ({r['device']})")
    axes[1].plot(batches, [x["latency_ms"]["p50"] for x in r["resident"]], "o-", label=f"{label} p50")
    axes[1].plot(batches, [x["latency_ms"]["p95"] for x in r["resident"]], "x--", label=f"{label} p95")
    if r.get("reload_per_job"):
        axes[1].axhline(r["reload_per_job"]["latency_ms"]["mean"], linestyle=":",
                        label=f"{label} load per job (mean)")
for ax in axes[:2]:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.legend(fontsize=8)
axes[0].set_ylabel("jobs/s (one batch in flight)")
axes[0].set_title("Throughput, model resident")
axes[1].set_yscale("log")
axes[1].set_ylabel("ms per batch (decode to detections)")
axes[1].set_title("Latency")
if gpu and gpu.get("gpu"):
    series = gpu["gpu"]["series"]
    t = [s[0] / 1000 for s in series]
    axes[2].plot(t, [s[1] * 100 for s in series], label="utilisation %")
    ax2 = axes[2].twinx()
    ax2.plot(t, [s[2] / 2**20 for s in series], color="tab:orange", label="memory MiB")
    ax2.set_ylabel("memory used, MiB")
    axes[2].set_title(f"NVML: {gpu['gpu']['name']} (driver {gpu['gpu']['driver']})")
    axes[2].set_xlabel("seconds")
    axes[2].set_ylabel("utilisation, %")
else:
    axes[2].text(0.5, 0.5, "no NVML readings", ha="center")
    axes[2].set_axis_off()
fig.tight_layout()
out = os.path.join(d, "gpu.png")
fig.savefig(out, dpi=90)
print("wrote", out)
