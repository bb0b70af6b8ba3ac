#!/usr/bin/env python3
"""`scripts/bench peers`: Celery against Ember, the same job per request, side by side.

Each system serves models/ssdlite-person on the local RabbitMQ and gets the same load:
tests/samples/astronaut.png as the job, from Python clients (one process each):

- sequential: one client, --warmup-jobs untimed, then --jobs jobs one at a time: p50/p95;
- closed loop: --clients clients each keeping one job outstanding, --warmup seconds untimed,
  then --duration seconds measured: ok answers per second, and p50/p95 of the jobs answered in
  that window.

Systems: `celery-prefork2x1` (prefork concurrency 2, 1 ORT thread each), `celery-prefork1x2`
(concurrency 1, 2 ORT threads), `ember` (target/release/ember-worker with its defaults, jobs by
pika with Direct Reply-to, as tests/clients/rpc_client.py sends them). Celery's side is
bench/peers/celery_app.py (what it does and why: its docstring). Each round starts every system
afresh on queues of its own (a new name per round), in a rotating order, measures it, stops it
and deletes its queues; --rounds rounds give each figure's median and spread (min-max).

Every answer is verified: its job id is the one sent, and its detections include a person (score
at or above the model's threshold, box IoU >= 0.9 with the one Ember and the README report for
this image). Answers are counted as ok, error (the system answered with an error), wrong (an ok
answer that failed the check) and failed (no answer within --job-timeout, or the client failed);
only ok answers count as throughput.

Writes <out>/peers.json: the machine, date, exact command, versions, each system's settings and
every round's figures. Bounded: stops itself after --max-minutes; the processes it starts (Celery
workers, ember-worker, its clients) are killed on exit, on error and on SIGINT/SIGTERM, and its
queues (and Celery's delayed-delivery topology, when this run created it) are deleted.

Run from anywhere: it creates .venv-peers (bench/peers/requirements.txt) on first use and runs
itself in it. It does not build Ember: `cargo build --release -p ember-worker` first
(scripts/bench does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENV = ROOT / ".venv-peers"
REQUIREMENTS = HERE / "requirements.txt"
STAMP = VENV / ".peers-requirements"
BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
IMAGE = ROOT / "tests" / "samples" / "astronaut.png"
MODEL_DIR = ROOT / "models" / "ssdlite-person"
# What Ember (README, docs/protocol.md) reports for astronaut.png: person 0.91 at [3, 34, 378, 509].
EXPECTED_BOX = (3.0, 34.0, 378.0, 509.0)
MIN_IOU = 0.9
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# Ember's variants: the worker's flags besides --ember-args (`ember`: its defaults).
EMBER_VARIANTS = {
    "ember": [],
    "ember-2x1": ["--instances", "2"],
    "ember-2x1-rt1": ["--instances", "2", "--runtime-threads", "1"],
}
SYSTEMS = ("celery-prefork2x1", "celery-prefork1x2", *EMBER_VARIANTS)
CELERY_TUNINGS = {"celery-prefork2x1": (2, 1), "celery-prefork1x2": (1, 2)}  # (processes, ORT threads)
OUTCOMES = ("ok", "error", "wrong", "failed")


# ---------------------------------------------------------------- the venv


def ensure_venv() -> None:
    """Re-runs this script in .venv-peers, creating or updating it first when needed."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    started = time.monotonic()
    installed = False
    if not python.exists():
        print(f"peers: creating {VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    wanted = REQUIREMENTS.read_text()
    if not STAMP.exists() or STAMP.read_text() != wanted:
        print(f"peers: installing {' '.join(wanted.split())}", file=sys.stderr)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
            check=True,
        )
        STAMP.write_text(wanted)
        installed = True
    env = dict(os.environ)
    if installed:
        env["EMBER_PEERS_INSTALL_S"] = f"{time.monotonic() - started:.1f}"
    env.setdefault("EMBER_PEERS_COMMAND", shlex.join(["python3", os.path.relpath(__file__, ROOT), *sys.argv[1:]]))
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


# ---------------------------------------------------------------- statistics (bench/src/stats.rs)


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = math.floor(q * (len(sorted_values) - 1) + 0.5)  # Rust's f64::round: half away from zero
    return sorted_values[min(rank, len(sorted_values) - 1)]


def summarise(values: list[float]) -> dict:
    s = sorted(values)
    n = len(s)
    if not n:
        return {"n": 0}
    mean = sum(s) / n
    var = sum((x - mean) ** 2 for x in s) / max(n - 1, 1)
    return {
        "n": n,
        "mean": mean,
        "sd": var**0.5,
        "p50": percentile(s, 0.5),
        "p95": percentile(s, 0.95),
        "p99": percentile(s, 0.99),
        "min": s[0],
        "max": s[-1],
    }


def across(rounds: list[float | None]) -> dict:
    values = sorted(v for v in rounds if v is not None)
    return {
        "median": percentile(values, 0.5),
        "min": values[0] if values else None,
        "max": values[-1] if values else None,
        "rounds": rounds,
    }


# ---------------------------------------------------------------- clients (one process each)


def iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def verify(sent_id: str, result: dict, threshold: float) -> tuple[str, str | None]:
    """An answer with status ok -> ("ok", None) or ("wrong", why)."""
    if result.get("job_id") != sent_id:
        return "wrong", f"job_id {result.get('job_id')!r}, sent {sent_id!r}"
    detections = (result.get("outputs") or {}).get("detections")
    if not isinstance(detections, list):
        return "wrong", f"no detections in {str(result)[:200]}"
    for d in detections:
        if d.get("label") == "person" and d.get("score", 0) >= threshold and iou(d.get("box", (0, 0, 0, 0)), EXPECTED_BOX) >= MIN_IOU:
            return "ok", None
    return "wrong", f"no person at {EXPECTED_BOX} in {detections}"


class EmberClient:
    """tests/clients/rpc_client.py's way (pika, Direct Reply-to), with publisher confirms."""

    def __init__(self, model: str):
        import pika

        self.pika = pika
        self.model = model
        self.connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
        self.replies: dict[str, bytes] = {}

    def _on_reply(self, _channel, _method, properties, body):
        self.replies[properties.correlation_id] = body

    def call(self, png: bytes, timeout: float) -> tuple[str, str, dict | None]:
        """(job id, status "ok"/"error"/"failed", the answer)."""
        job = str(uuid.uuid4())
        properties = self.pika.BasicProperties(
            message_id=job,
            correlation_id=job,
            reply_to=DIRECT_REPLY_TO,
            content_type="image/png",
            delivery_mode=2,
            headers={"ember-submitted-at": int(time.time() * 1000)},
        )
        # Blocks until the broker confirms (raises when it nacks or cannot route it).
        self.channel.basic_publish("ember.jobs", self.model, png, properties, mandatory=True)
        deadline = time.monotonic() + timeout
        while job not in self.replies:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return job, "failed", {"why": f"no answer within {timeout} s"}
            self.connection.process_data_events(time_limit=remaining)
        result = json.loads(self.replies.pop(job))
        return job, ("ok" if result.get("status") == "ok" else "error"), result

    def close(self):
        try:
            self.connection.close()
        except Exception:
            pass


class CeleryClient:
    """Celery's own client: send_task, then AsyncResult.get on the rpc:// backend."""

    def __init__(self, queue: str):
        os.environ["EMBER_PEERS_QUEUE"] = queue
        sys.path.insert(0, str(HERE))
        import celery_app

        self.app = celery_app.app
        self.task = celery_app.TASK

    def call(self, png: bytes, timeout: float) -> tuple[str, str, dict | None]:
        from celery.exceptions import TimeoutError as CeleryTimeout

        job = str(uuid.uuid4())
        pending = self.app.send_task(self.task, args=(png,), task_id=job)
        try:
            value = pending.get(timeout=timeout, propagate=False)
        except CeleryTimeout:
            return job, "failed", {"why": f"no answer within {timeout} s"}
        if pending.state == "SUCCESS" and isinstance(value, dict):
            return job, "ok", value
        return job, "error", {"state": pending.state, "error": repr(value)[:300]}

    def close(self):
        try:
            self.app.close()
        except Exception:
            pass


def make_client(spec: dict):
    return EmberClient(spec["target"]) if spec["kind"] == "ember" else CeleryClient(spec["target"])


def one_job(client, png: bytes, spec: dict) -> tuple[float, float, str, object]:
    """(sent, answered (monotonic), outcome, detail): detail is the answer's detections when ok."""
    sent = time.monotonic()
    try:
        job, status, result = client.call(png, spec["job_timeout"])
    except Exception as error:  # the client failed: counted, never raised
        return sent, time.monotonic(), "failed", f"{type(error).__name__}: {error}"[:300]
    answered = time.monotonic()
    if status == "ok":
        outcome, why = verify(job, result, spec["threshold"])
        detail = why if why else {"detections": result["outputs"]["detections"], "timing": result.get("timing")}
        return sent, answered, outcome, detail
    return sent, answered, status, json.dumps(result)[:300]


def slim(records: list) -> list:
    """The records with the whole answer kept on the first ok one and the ones not ok, and only
    the worker's timing on the other ok ones."""
    kept, out = False, []
    for r in records:
        if r[3] == "ok":
            r = r if not kept else r[:4] + ({"timing": (r[4] or {}).get("timing")},)
            kept = True
        out.append(r)
    return out


def timing_means(records) -> dict:
    """Means of the numeric fields of the ok answers' `timing` (each system's own stages)."""
    sums: dict[str, list[float]] = {}
    for r in records:
        timing = (r[4] or {}).get("timing") if r[3] == "ok" and isinstance(r[4], dict) else None
        for k, v in (timing or {}).items():
            if isinstance(v, (int, float)):
                sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sorted(sums.items())}


def client_main(spec: dict, ready, go, out) -> None:
    """One client: connect, one untimed job, say ready, wait for the start, run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops us
    _die_with_parent()
    png = Path(spec["image"]).read_bytes()
    records = []
    client = None
    try:
        client = make_client(spec)
        records.append(("connect",) + one_job(client, png, spec))
        ready.put(spec["index"])
        start_at, end_at = go.get(timeout=spec["ready_timeout"])
        time.sleep(max(0.0, start_at - time.monotonic()))
        if spec["mode"] == "sequential":
            for i in range(spec["warmup_jobs"] + spec["jobs"]):
                phase = "warmup" if i < spec["warmup_jobs"] else "timed"
                records.append((phase,) + one_job(client, png, spec))
        else:
            while time.monotonic() < end_at:
                record = one_job(client, png, spec)
                records.append(("loop",) + record)
                if record[2] == "failed":
                    # The connection may be gone: start again with a new client, once a second.
                    client.close()
                    time.sleep(min(1.0, max(0.0, end_at - time.monotonic())))
                    try:
                        client = make_client(spec)
                    except Exception:
                        pass
        out.put((spec["index"], slim(records), None))
    except Exception as error:
        out.put((spec["index"], slim(records), f"{type(error).__name__}: {error}"[:500]))
    finally:
        if client is not None:
            client.close()


def run_clients(ctx, spec: dict, count: int, warmup_s: float, duration_s: float, live: list) -> dict:
    """Starts `count` clients, starts them together, and gathers their records."""
    ready, out = ctx.Queue(), ctx.Queue()
    gos = []
    procs = []
    for index in range(count):
        go = ctx.Queue()
        p = ctx.Process(target=client_main, args=({**spec, "index": index}, ready, go, out), daemon=True)
        p.start()
        live.append(p)
        procs.append(p)
        gos.append(go)
    deadline = time.monotonic() + spec["ready_timeout"]
    waiting = count
    while waiting:
        try:
            ready.get(timeout=1.0)
            waiting -= 1
            continue
        except Exception:
            pass
        # A client that failed before it was ready has reported on `out`.
        early = []
        while not out.empty():
            early.append(out.get())
        if early:
            raise RuntimeError(f"clients did not start: {[e[2] for e in early][:3]}")
        if time.monotonic() >= deadline or not any(p.is_alive() for p in procs):
            raise RuntimeError(f"{waiting} of {count} clients not ready")
    start_at = time.monotonic() + 0.3
    measure_from = start_at + warmup_s
    end_at = measure_from + duration_s
    for go in gos:
        go.put((start_at, end_at))
    results = []
    limit = end_at + spec["job_timeout"] + 30 if spec["mode"] == "closed" else start_at + spec["sequential_limit"]
    while len(results) < count:
        try:
            results.append(out.get(timeout=max(0.1, limit - time.monotonic())))
        except Exception:
            raise RuntimeError(f"{count - len(results)} clients did not finish in time") from None
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
        live.remove(p)
    errors = [e for _, _, e in results if e]
    records = [r for _, rs, _ in results for r in rs]
    return {"records": records, "client_errors": errors, "measure_from": measure_from, "end_at": end_at}


def counts(records) -> dict:
    c = {k: 0 for k in OUTCOMES}
    for r in records:
        c[r[3]] += 1
    return c


def examples(records) -> list:
    return [f"{r[3]}: {r[4]}" for r in records if r[3] != "ok"][:5]


def sequential(ctx, spec: dict, live: list) -> dict:
    run = run_clients(ctx, {**spec, "mode": "sequential"}, 1, 0.0, 0.0, live)
    timed = [r for r in run["records"] if r[0] == "timed"]
    ok_ms = [(r[2] - r[1]) * 1e3 for r in timed if r[3] == "ok"]
    s = summarise(ok_ms)
    return {
        "latency_ms": s,
        "p50_ms": s.get("p50"),
        "p95_ms": s.get("p95"),
        "counts_timed": counts(timed),
        "answer_timing_means": timing_means(timed),
        "counts_total": counts(run["records"]),
        "not_ok_examples": examples(run["records"]),
        "client_errors": run["client_errors"],
        "first_answer": next((r[4] for r in run["records"] if r[3] == "ok"), None),
    }


def closed_loop(ctx, spec: dict, clients: int, warmup_s: float, duration_s: float, live: list) -> dict:
    run = run_clients(ctx, {**spec, "mode": "closed"}, clients, warmup_s, duration_s, live)
    lo, hi = run["measure_from"], run["end_at"]
    window = [r for r in run["records"] if r[0] == "loop" and lo <= r[2] <= hi]
    ok_ms = [(r[2] - r[1]) * 1e3 for r in window if r[3] == "ok"]
    c = counts(window)
    s = summarise(ok_ms)
    return {
        "throughput_jobs_s": c["ok"] / (hi - lo),
        "latency_ms": s,
        "p50_ms": s.get("p50"),
        "p95_ms": s.get("p95"),
        "counts_window": c,
        "answer_timing_means": timing_means(window),
        "counts_total": counts(run["records"]),
        "not_ok_examples": examples(run["records"]),
        "client_errors": run["client_errors"],
    }


# ---------------------------------------------------------------- the broker


def broker_channel():
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    return connection, connection.channel()


def queue_state(name: str) -> tuple[int, int] | None:
    """(messages, consumers) of a queue, or None when it does not exist."""
    import pika

    connection, channel = broker_channel()
    try:
        ok = channel.queue_declare(name, passive=True)
        return ok.method.message_count, ok.method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return None
    finally:
        try:
            connection.close()
        except Exception:
            pass


def exchange_exists(name: str) -> bool:
    import pika

    connection, channel = broker_channel()
    try:
        channel.exchange_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        try:
            connection.close()
        except Exception:
            pass


def delete(queues=(), exchanges=()) -> None:
    """Deletes queues and exchanges (those that are not there are no error)."""
    import pika

    connection, channel = broker_channel()
    try:
        for q in queues:
            try:
                channel.queue_delete(q)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()
        for x in exchanges:
            try:
                channel.exchange_delete(x)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()
    finally:
        try:
            connection.close()
        except Exception:
            pass


def bound_from(queue: str) -> list[str] | None:
    """The exchanges `queue` is bound to, by rabbitmqctl (None when it cannot say)."""
    try:
        listed = subprocess.run(
            ["rabbitmqctl", "list_bindings", "source_name", "destination_name", "routing_key", "-q", "--no-table-headers"],
            capture_output=True, text=True, timeout=60,
        )
    except Exception:
        return None
    if listed.returncode != 0:
        return None
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    return [f"{r[0]} ({r[2]})" for r in rows if len(r) >= 3 and r[1] == queue and r[0]]


def rabbitmq_version() -> str | None:
    connection, _ = broker_channel()
    try:
        props = connection._impl.server_properties or {}
        v = props.get("version") or props.get(b"version")
        return v.decode() if isinstance(v, bytes) else v
    finally:
        connection.close()


CELERY_DELAYED_QUEUES = [f"celery_delayed_{level}" for level in range(28)]
CELERY_DELAYED_EXCHANGES = CELERY_DELAYED_QUEUES + ["celery_delayed_delivery"]
# Present while Celery's delayed-delivery topology made by a run is on the broker (a run that was
# SIGKILLed leaves it; the next run deletes it).
DELAYED_MARKER = VENV / ".celery-delayed-made-by-peers"
LEFTOVER_QUEUE = re.compile(r"^(ember\.(jobs|retry|dead|deadnotice)\.)?bench-peers-[0-9a-f]{8}-r[0-9]+-")


def sweep_leftovers() -> None:
    """Deletes what an earlier run that was killed (SIGKILL: no clean-up) left on the broker: its
    queues and exchanges (bench-peers-<run>-r<round>-...) and, when it made them, Celery's
    delayed-delivery queues. Lists with rabbitmqctl (the local broker), as scripts/sweep_queues.py."""
    def names(what: str) -> list[str]:
        listed = subprocess.run(["rabbitmqctl", f"list_{what}", "name", "-q", "--no-table-headers"],
                                capture_output=True, text=True, timeout=120)
        if listed.returncode != 0:
            raise RuntimeError(listed.stderr.strip())
        return [n.strip() for n in listed.stdout.splitlines() if LEFTOVER_QUEUE.match(n.strip())]

    try:
        queues, exchanges = names("queues"), names("exchanges")
    except Exception as error:
        print(f"peers: not sweeping earlier runs' queues (rabbitmqctl: {error})", file=sys.stderr)
        queues, exchanges = [], []
    if DELAYED_MARKER.exists():
        queues += CELERY_DELAYED_QUEUES
        exchanges += CELERY_DELAYED_EXCHANGES
    if queues or exchanges:
        delete(queues=queues, exchanges=exchanges)
        print(f"peers: swept {len(queues)} queues and {len(exchanges)} exchanges left by a killed run", file=sys.stderr)
    DELAYED_MARKER.unlink(missing_ok=True)


def ember_queues(model: str, version: str) -> list[str]:
    return [
        f"ember.jobs.{model}",
        f"ember.retry.{model}",
        f"ember.dead.{model}",
        f"ember.deadnotice.{model}",
        f"ember.jobs.{model}@{version}",
    ]


# ---------------------------------------------------------------- the systems' processes


class Started:
    """A process group this run started, stopped (TERM, then KILL of the group) by stop()."""

    def __init__(self, name: str, cmd: list[str], env: dict, cwd: Path, log: Path):
        self.name, self.log = name, log
        self.file = open(log, "wb")
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self.file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float) -> None:
        if self.alive():
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of its group (Celery's pool processes)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.file.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the driver dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def wait_until(check, within: float, what: str, proc: Started) -> None:
    deadline = time.monotonic() + within
    while not check():
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited while {what}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: not {what} within {within:.0f} s:\n{proc.log_tail()}")
        time.sleep(0.1)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_celery(system: str, queue: str, logs: Path) -> Started:
    processes, threads = CELERY_TUNINGS[system]
    ready = Path(tempfile.mkdtemp(prefix=f"{queue}-ready-", dir=logs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_PEERS_")}
    env.update(
        EMBER_PEERS_QUEUE=queue,
        EMBER_PEERS_ORT_THREADS=str(threads),
        EMBER_PEERS_READY_DIR=str(ready),
        PYTHONPATH=str(HERE),
    )
    cmd = celery_command(processes, queue)
    proc = Started(f"celery worker ({system})", cmd, env, HERE, logs / f"{queue}.log")
    wait_until(lambda: len(list(ready.iterdir())) >= processes, 120, "with every pool process's model loaded", proc)
    wait_until(lambda: (queue_state(queue) or (0, 0))[1] >= 1, 60, "consuming", proc)
    return proc


def celery_command(processes: int, queue: str) -> list[str]:
    return [
        str(VENV / "bin" / "celery"), "-A", "celery_app", "worker",
        "--pool", "prefork", "--concurrency", str(processes), "-O", "fair",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-Q", queue, "-n", f"{queue}@%h", "--loglevel", "WARNING",
    ]


def ort_dylib() -> str | None:
    """The library the worker loads: $ORT_DYLIB_PATH, else the project's .venv's (what
    scripts/setup installs), else .venv-peers's (the same onnxruntime==1.31.1 wheel)."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return os.environ["ORT_DYLIB_PATH"]
    for venv in (ROOT / ".venv", VENV):
        found = sorted(venv.glob("lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*"))
        if found:
            return str(found[-1])
    return None


def start_ember(binary: Path, model: str, extra: list[str], logs: Path) -> Started:
    admin = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    env["EMBER_LOG"] = "warn"
    lib = ort_dylib()
    if lib:
        env["ORT_DYLIB_PATH"] = lib
    cmd = [
        str(binary), "--model-dir", str(MODEL_DIR), "--model-name", model,
        "--admin-addr", f"127.0.0.1:{admin}", *extra,
    ]
    proc = Started("ember-worker", cmd, env, ROOT, logs / f"{model}.log")

    def ready() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
                return r.status == 200
        except Exception:
            return False

    wait_until(ready, 120, "ready (/readyz)", proc)
    return proc


# ---------------------------------------------------------------- the run


def model_spec() -> dict:
    import tomllib

    return tomllib.loads((MODEL_DIR / "model.toml").read_text())


def versions(binary: Path) -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for package in ("celery", "kombu", "amqp", "billiard", "msgpack", "pika", "pillow", "numpy", "onnxruntime"):
        try:
            out[package] = version(package)
        except Exception:
            out[package] = None
    try:
        out["rabbitmq"] = rabbitmq_version()
    except Exception:
        out["rabbitmq"] = None
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.rstrip("\n")  # noqa: E731
    out["ember_commit"] = git("rev-parse", "HEAD").strip() or None
    dirty = git("status", "--porcelain", "--", "worker", "core", "protocol", "Cargo.lock")
    out["ember_tree_changes"] = dirty.splitlines() if dirty else []
    if binary.exists():
        try:
            out["ember_worker"] = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            out["ember_worker"] = None
        out["ember_worker_built"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(binary.stat().st_mtime))
    out["ort_dylib_for_ember"] = ort_dylib()
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_at_start": list(os.getloadavg()),
    }


WORKER_TUNING_FLAGS = ("--max-batch", "--max-batch-delay", "--prefetch", "--intra-threads", "--instances", "--runtime-threads", "--ort-spin")


def worker_help(binary: Path) -> dict:
    """The tuning flags' help, defaults included, as the binary itself prints it (clap's --help:
    an option's line, then its indented text, until the next option)."""
    try:
        text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return {}
    blocks: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("-"):
            flag = next((t.rstrip(",") for t in stripped.split() if t.startswith("--")), None)
            current = flag if flag in WORKER_TUNING_FLAGS else None
        if current and stripped:
            blocks.setdefault(current, []).append(stripped)
    return {k: " ".join(v) for k, v in blocks.items()}


def settings_of(system: str, args, spec: dict, binary: Path) -> dict:
    if system in EMBER_VARIANTS:
        return {
            "what": "target/release/ember-worker, one process, jobs published by pika with Direct Reply-to",
            "worker_flags": shlex.join([*EMBER_VARIANTS[system], *shlex.split(args.ember_args)])
            or "(none: the documented defaults, docs/worker.md)",
            "worker_help": worker_help(binary),
            "max_batch": "model.toml's max_batch (%s) unless --max-batch" % spec.get("max_batch"),
            "max_batch_delay": "5ms (default)",
            "prefetch": "2 x max batch (default)",
            "ort_intra_threads": "0: the cores this process may use (%d here), divided among the instances" % len(os.sched_getaffinity(0)),
            "ort_spinning": "off (default)",
            "ort_graph_optimization": "ort's Level3 = ORT_ENABLE_LAYOUT (worker/src/runtime.rs)",
            "queue": "ember.jobs.<model>: quorum, x-delivery-limit 5, x-overflow reject-publish, x-max-length 10000, DLX ember.dlx at-least-once",
            "job": "persistent, publisher confirm awaited, message_id = correlation_id = job id, header ember-submitted-at, mandatory",
            "result": "published with confirms where docs/protocol.md ('A result') says at this commit: "
            "reply_to (Direct Reply-to) and the results exchange (a durable copy when ember.results.store "
            "is there and bound: results_store_queue), then the job is acked",
        }
    import celery_app

    processes, threads = CELERY_TUNINGS[system]
    conf = celery_app.settings("<per-round queue>")
    conf["task_queues"] = [f"<queue>: durable, {celery_app.QUEUE_ARGUMENTS}"]
    return {
        "what": "bench/peers/celery_app.py: task peers.detect, clients by send_task + AsyncResult.get",
        "pool": "prefork",
        "concurrency": processes,
        "ort_intra_threads_per_process": threads,
        "ort_spinning": "off",
        "ort_graph_optimization": "ORT_ENABLE_LAYOUT (the worker's: ort's Level3)",
        "worker_command": "cd bench/peers && " + shlex.join(
            [os.path.relpath(celery_command(processes, "<queue>")[0], HERE), *celery_command(processes, "<queue>")[1:]]
        ),
        "app": conf,
        "delayed_delivery": "Celery's DelayedDelivery bootstep (on with quorum queues) declares celery_delayed_0..27 and binds the task queue; no job uses it",
    }


def run(args) -> int:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    binary = Path(args.worker)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    if any(s in EMBER_VARIANTS for s in systems) and not binary.exists():
        raise SystemExit(f"{binary} is missing: cargo build --release -p ember-worker (or leave ember out of --systems)")
    if any(s in EMBER_VARIANTS for s in systems) and not ort_dylib():
        raise SystemExit("no libonnxruntime.so for the worker: set ORT_DYLIB_PATH or run scripts/setup")
    try:
        rabbitmq = rabbitmq_version()
    except Exception as error:
        raise SystemExit(f"no RabbitMQ at {BROKER_URL} ({error}): run scripts/setup") from None
    spec_toml = model_spec()
    threshold = float(spec_toml["output"].get("score_threshold", 0.5))
    version = str(spec_toml.get("version", "1"))
    tag = uuid.uuid4().hex[:8]
    logs = Path(tempfile.mkdtemp(prefix=f"ember-peers-{tag}-"))
    print(f"peers: run {tag}, logs in {logs}, RabbitMQ {rabbitmq}", file=sys.stderr)

    live_clients: list = []
    started: list[Started] = []
    made_queues: list[str] = []
    made_exchanges: list[str] = []
    sweep_leftovers()
    delayed_existed = queue_state(CELERY_DELAYED_QUEUES[0]) is not None or exchange_exists("celery_delayed_delivery")
    if not delayed_existed and any(s.startswith("celery") for s in systems):
        DELAYED_MARKER.write_text(tag)
    results_store = queue_state("ember.results.store")
    doc = {
        "scenario": "peers",
        "command": os.environ.get("EMBER_PEERS_COMMAND") or shlex.join(["python3", *sys.argv]),
        "machine": machine(),
        "versions": versions(binary),
        "venv_install_s": float(os.environ["EMBER_PEERS_INSTALL_S"]) if os.environ.get("EMBER_PEERS_INSTALL_S") else None,
        "image": f"tests/samples/astronaut.png ({IMAGE.stat().st_size} bytes, 512x512)",
        "model": "models/ssdlite-person",
        "load": {
            "rounds": args.rounds,
            "sequential_jobs": args.jobs,
            "sequential_warmup_jobs": args.warmup_jobs,
            "clients": args.clients,
            "outstanding_per_client": 1,
            "closed_loop_warmup_s": args.warmup,
            "closed_loop_duration_s": args.duration,
            "job_timeout_s": args.job_timeout,
            "order": "each round runs every system afresh (new queues, new processes), rotating the order by one each round",
            "clients_are": "Python processes on the same machine as the systems and the broker, one connection each",
        },
        "verification": (
            f"every answer: job id equals the id sent; a detection labelled person with score >= {threshold} "
            f"and box IoU >= {MIN_IOU} with {list(EXPECTED_BOX)}. ok = answered and verified; error = the system "
            "answered with an error; wrong = an ok answer that failed the check; failed = no answer within "
            "job_timeout_s or the client failed. Throughput and latencies count ok answers only."
        ),
        "results_store_queue": (
            {"present": True, "messages": results_store[0], "bound_from": bound_from("ember.results.store")}
            if results_store
            else {"present": False}
        ),
        "systems": {s: {"settings": settings_of(s, args, spec_toml, binary), "rounds": []} for s in systems},
    }
    spec_base = {
        "image": str(IMAGE),
        "threshold": threshold,
        "job_timeout": args.job_timeout,
        "ready_timeout": 120.0,
        "jobs": args.jobs,
        "warmup_jobs": args.warmup_jobs,
        "sequential_limit": args.job_timeout * (args.jobs + args.warmup_jobs + 1) + 60,
    }
    not_ok = 0
    try:
        for round_no in range(args.rounds):
            order = systems[round_no % len(systems):] + systems[: round_no % len(systems)]
            for system in order:
                # bench-*: the prefix scripts/sweep_queues.py sweeps (ember.jobs.bench-...) after a
                # run that was killed before it could delete its queues.
                name = f"bench-peers-{tag}-r{round_no}"
                proc = None
                record = {"round": round_no, "loadavg_before": list(os.getloadavg())}
                try:
                    if system in EMBER_VARIANTS:
                        model = f"{name}-{system}"
                        made_queues.extend(ember_queues(model, version))
                        flags = [*EMBER_VARIANTS[system], *shlex.split(args.ember_args)]
                        proc = start_ember(binary, model, flags, logs)
                        spec = {**spec_base, "kind": "ember", "target": model}
                    else:
                        queue = f"{name}-{system}"
                        made_queues.append(queue)
                        made_exchanges.append(queue)
                        if not delayed_existed:
                            made_queues.extend(q for q in CELERY_DELAYED_QUEUES if q not in made_queues)
                            made_exchanges.extend(x for x in CELERY_DELAYED_EXCHANGES if x not in made_exchanges)
                        proc = start_celery(system, queue, logs)
                        spec = {**spec_base, "kind": "celery", "target": queue}
                    started.append(proc)
                    record["sequential"] = sequential(ctx, spec, live_clients)
                    record["closed_loop"] = closed_loop(ctx, spec, args.clients, args.warmup, args.duration, live_clients)
                finally:
                    if proc is not None:
                        proc.stop(grace=30)
                        started.remove(proc)
                    try:
                        if system in EMBER_VARIANTS:
                            delete(queues=ember_queues(f"{name}-{system}", version))
                        else:
                            delete(queues=[f"{name}-{system}"], exchanges=[f"{name}-{system}"])
                    except Exception as error:  # tried again at the end
                        print(f"peers: deleting {name}'s queues: {error}", file=sys.stderr)
                doc["systems"][system]["rounds"].append(record)
                seq, loop = record["sequential"], record["closed_loop"]
                bad = sum(v for k, v in seq["counts_total"].items() if k != "ok") + sum(
                    v for k, v in loop["counts_total"].items() if k != "ok"
                )
                not_ok += bad
                print(
                    f"{system} round {round_no}: sequential p50 {fmt(seq['p50_ms'])} ms, p95 {fmt(seq['p95_ms'])} ms "
                    f"({seq['counts_timed']['ok']}/{args.jobs} ok); {args.clients} clients: "
                    f"{loop['throughput_jobs_s']:.1f} jobs/s, p50 {fmt(loop['p50_ms'])} ms, p95 {fmt(loop['p95_ms'])} ms "
                    f"(window {fmt_counts(loop['counts_window'])}; all answers {fmt_counts(add(seq['counts_total'], loop['counts_total']))})",
                    flush=True,
                )
                for example in seq["not_ok_examples"] + loop["not_ok_examples"]:
                    print(f"  {example}", flush=True)
    finally:
        for p in list(live_clients):
            p.kill()
        for proc in list(started):
            proc.stop(grace=5)
        try:
            delete(queues=made_queues, exchanges=made_exchanges)
            DELAYED_MARKER.unlink(missing_ok=True)
        except Exception as error:
            print(f"peers: could not delete its queues ({error}): {made_queues}", file=sys.stderr)

    summarise_doc(doc)
    doc["machine"]["loadavg_at_end"] = list(os.getloadavg())
    doc["answers_not_ok"] = not_ok
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "peers.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print_summary(doc)
    print(f"wrote {path}", file=sys.stderr)
    if not_ok:
        print(f"peers: {not_ok} answers were not ok (see not_ok_examples in {path})", file=sys.stderr)
        return 1
    return 0


def add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in OUTCOMES}


def fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_counts(c: dict) -> str:
    return ", ".join(f"{k} {c[k]}" for k in OUTCOMES)


def summarise_doc(doc: dict) -> None:
    for system in doc["systems"].values():
        rounds = system["rounds"]
        system["summary"] = {
            "sequential_p50_ms": across([r["sequential"]["p50_ms"] for r in rounds]),
            "sequential_p95_ms": across([r["sequential"]["p95_ms"] for r in rounds]),
            "throughput_jobs_s": across([r["closed_loop"]["throughput_jobs_s"] for r in rounds]),
            "closed_loop_p50_ms": across([r["closed_loop"]["p50_ms"] for r in rounds]),
            "closed_loop_p95_ms": across([r["closed_loop"]["p95_ms"] for r in rounds]),
            "answers": {
                k: sum(r["sequential"]["counts_total"][k] + r["closed_loop"]["counts_total"][k] for r in rounds)
                for k in OUTCOMES
            },
        }
        system["first_answer"] = next((r["sequential"]["first_answer"] for r in rounds if r["sequential"]["first_answer"]), None)
    celery = {k: v for k, v in doc["systems"].items() if k.startswith("celery")}
    median = lambda s, k: s["summary"][k]["median"]  # noqa: E731
    if celery:
        best = max(celery, key=lambda k: median(celery[k], "throughput_jobs_s") or 0)
        doc["celery_best"] = {"system": best, "rule": "the Celery tuning with the higher median throughput"}
        embers = {k: v for k, v in doc["systems"].items() if k in EMBER_VARIANTS}
        if embers and median(celery[best], "throughput_jobs_s"):
            c = celery[best]
            name = max(embers, key=lambda k: median(embers[k], "throughput_jobs_s") or 0)
            ember = embers[name]
            doc["comparison"] = {
                "ember_best": name,
                "throughput_ratio_ember_over_celery_best": median(ember, "throughput_jobs_s") / median(c, "throughput_jobs_s"),
                "closed_loop_p95_ms": {"ember": median(ember, "closed_loop_p95_ms"), "celery_best": median(c, "closed_loop_p95_ms")},
                "sequential_p50_ms": {"ember": median(ember, "sequential_p50_ms"), "celery_best": median(c, "sequential_p50_ms")},
            }


def print_summary(doc: dict) -> None:
    print("\nmedian of rounds (min-max)")
    print(f"{'system':<20} {'seq p50 ms':>20} {'seq p95 ms':>20} {'jobs/s':>20} {'loop p95 ms':>20}  answers")
    for name, system in doc["systems"].items():
        s = system["summary"]
        cell = lambda k: f"{fmt(s[k]['median'])} ({fmt(s[k]['min'])}-{fmt(s[k]['max'])})"  # noqa: E731
        print(
            f"{name:<20} {cell('sequential_p50_ms'):>20} {cell('sequential_p95_ms'):>20} "
            f"{cell('throughput_jobs_s'):>20} {cell('closed_loop_p95_ms'):>20}  {fmt_counts(s['answers'])}"
        )
    if "celery_best" in doc:
        print(f"best Celery tuning: {doc['celery_best']['system']}")
    if "comparison" in doc:
        print(f"Ember / best Celery throughput: {doc['comparison']['throughput_ratio_ember_over_celery_best']:.2f}x")


class RunTooLong(BaseException):
    """--max-minutes passed (a BaseException: no `except Exception` on the way swallows it)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=100, help="sequential jobs per round (timed)")
    parser.add_argument("--warmup-jobs", type=int, default=5, help="sequential jobs before the timed ones")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients, one job outstanding each")
    parser.add_argument("--warmup", type=float, default=3.0, help="closed-loop seconds before measuring")
    parser.add_argument("--duration", type=float, default=15.0, help="closed-loop seconds measured")
    parser.add_argument("--job-timeout", type=float, default=30.0, help="seconds an answer may take before it counts as failed")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--worker", default=str(ROOT / "target" / "release" / "ember-worker"))
    parser.add_argument("--ember-args", default="", help="extra ember-worker flags (recorded with the figures)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"), help="directory for peers.json")
    parser.add_argument("--max-minutes", type=float, default=40.0, help="the whole run stops (and cleans up) after this")
    args = parser.parse_args()
    if min(args.rounds, args.jobs, args.clients) < 1 or args.duration <= 0:
        parser.error("--rounds, --jobs, --clients and --duration must be positive")

    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def too_long(_signum, _frame):
        raise RunTooLong(f"the run took more than --max-minutes {args.max_minutes}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(max(1, int(args.max_minutes * 60)))
    try:
        return run(args)
    except (KeyboardInterrupt, RunTooLong) as error:
        print(f"peers: stopped ({error}); its processes and queues are cleaned up", file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else 124
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    ensure_venv()
    sys.exit(main())
