#!/usr/bin/env python3
"""Plots the benchmark JSON in docs/benchmarks/ (written by ember-bench) to PNGs beside it."""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

d = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks"


def load(name):
    path = os.path.join(d, f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def save(fig, name):
    fig.tight_layout()
    out = os.path.join(d, f"{name}.png")
    fig.savefig(out, dpi=90)
    print("wrote", out)


r = load("residency")
if r:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=False)
    for ax, mode, colour in [(axes[0], "reload_per_job", "tab:blue"), (axes[1], "resident", "tab:red")]:
        ys = np.array(r[mode]["per_request_s_round0"]) * 1000
        xs = np.arange(1, len(ys) + 1)
        ax.bar(xs, ys, color=colour, width=0.8)
        slope, intercept = np.polyfit(xs, ys, 1)
        ax.plot(xs, slope * xs + intercept, color="black", lw=1.5, label=f"trend ({slope:+.3f} ms/request)")
        ax.set_title(f"{mode.replace('_', ' ')}: mean {ys.mean():.1f} ms, sd {ys.std(ddof=1):.1f} ms")
        ax.set_xlabel("request")
        ax.set_ylabel("response time, ms")
        ax.legend()
    fig.suptitle("100 sequential SSD jobs through the queue: resident vs load-per-job")
    save(fig, "residency")

o = load("overhead")
if o:
    detail = o["rounds_detail"]
    mid = sorted(range(len(detail)), key=lambda i: detail[i]["amqp_s"]["p50"])[len(detail) // 2]
    row = detail[mid]
    labels = ["bare session.run", "AMQP end to end", "HTTP end to end"]
    keys = ["bare_run_s", "amqp_s", "http_s"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.25
    for i, q in enumerate(["p50", "p95", "p99"]):
        ax.bar(np.arange(3) + (i - 1) * width, [row[k][q] * 1000 for k in keys], width, label=q)
    ax.set_xticks(np.arange(3), labels)
    ax.set_ylabel("ms")
    ax.set_title("SSD model, one 512x512 image per job (median round)")
    ax.legend()
    save(fig, "overhead")

t = load("throughput")
if t:
    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = [k for k in ("reply_only", "stored") if k in t]
    width = 0.38
    for i, (key, label, color) in enumerate([("broker_ceiling_jobs_s", "broker ceiling (raw AMQP pattern)", "tab:gray"),
                                             ("fleet_jobs_s", "Ember fleet (tiny model)", "tab:red")]):
        vals = [t[k][key] for k in kinds]
        ax.bar(np.arange(len(kinds)) + (i - 0.5) * width, [v["median"] for v in vals], width,
               yerr=[[v["median"] - v["min"] for v in vals], [v["max"] - v["median"] for v in vals]],
               color=color, capsize=6, label=label)
    ax.set_xticks(np.arange(len(kinds)), [f"{k.replace('_', '-')} jobs\nratio {t[k]['ratio']:.2f}" for k in kinds])
    ax.set_ylabel("jobs/s")
    ax.set_title(f"{t['publishers']} publishers x {t['window']} outstanding (median round, spread)")
    ax.legend()
    save(fig, "throughput")

b = load("batching")
if b:
    sizes = [1, 4, 8]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    served = [b[f"max_batch_{s}"]["served_jobs_s"]["median"] for s in sizes]
    p95 = [b[f"max_batch_{s}"]["p95_s"]["median"] * 1000 for s in sizes]
    ax1.bar([str(s) for s in sizes], served, color="tab:blue", alpha=0.7, label="served jobs/s")
    ax1.set_xlabel("max batch")
    ax1.set_ylabel("served jobs/s")
    ax2 = ax1.twinx()
    ax2.plot([str(s) for s in sizes], p95, color="tab:red", marker="o", label="p95 latency")
    ax2.set_ylabel("p95, ms")
    ax1.set_title(f"SSD at {b['offered_jobs_s']} jobs/s offered (2 vCPU)")
    save(fig, "batching")

m = load("memory")
if m:
    # One line per round (older files: one soak, its samples at the top level).
    rounds = m.get("rounds") or [m]
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, r in enumerate(rounds):
        s = np.array(r["samples"])
        ax.plot(s[:, 0], s[:, 1], label=f"worker, round {i}", color="C0", alpha=1 - 0.25 * i)
        ax.plot(s[:, 0], s[:, 2], label=f"dispatcher, round {i}", color="C1", alpha=1 - 0.25 * i)
    sent = rounds[0].get("jobs_sent", rounds[0].get("jobs"))
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MiB")
    ax.set_title(f"soak: {sent} jobs sent per round at {m['rate_jobs_s']}/s")
    ax.legend(fontsize="small")
    save(fig, "memory")

p = load("peers")
if p:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(p["systems"])
    for ax, key, label in [(left, "throughput_jobs_s", "ok answers/s, 8 clients x 1 outstanding"),
                           (right, "sequential_p50_ms", "sequential p50, ms")]:
        vals = [p["systems"][n]["summary"][key] for n in names]
        ax.bar(np.arange(len(names)), [v["median"] for v in vals],
               yerr=[[v["median"] - v["min"] for v in vals], [v["max"] - v["median"] for v in vals]],
               color=["tab:gray" if n.startswith("celery") else "tab:red" for n in names], capsize=6)
        ax.set_xticks(np.arange(len(names)), names, rotation=20)
        ax.set_title(label)
    fig.suptitle("SSD on astronaut.png, same broker, median of rounds (spread)")
    save(fig, "peers")
