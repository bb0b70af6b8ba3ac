#!/usr/bin/env python3
"""Drives the real ember-autoscaler binary (kubernetes backend) against kmock's Kubernetes API
emulator over HTTP, with a kubeconfig pointing at it, and RabbitMQ for the jobs.

Seeds a Deployment and an InferencePool, starts the autoscaler, waits until it has measured the
model's queue empty (its first status on the pool), then publishes the jobs as one burst (one AMQP
transaction, so a reading sees none or all of them) — no worker runs, so they wait — and waits
until the emulator holds: the Deployment scaled up, the pool's status written by that decision, a
ScaledUp Event, and the leader Lease. Prints the observed objects as JSON; exits 1 with the
autoscaler's log if they never show up.

Deterministic under load:
- The jobs arrive between two of the autoscaler's readings, the first of them an empty queue, so
  it sees them arrive (an arrival rate), not a backlog that was already there at its first look.
- The status reported is the pool's version written by the scale-up decision (kmock keeps every
  version), not whatever a later tick wrote over it.
- The event loop never blocks: kmock serves the autoscaler from this loop, so every pika call runs
  on one daemon thread of its own and the autoscaler is an asyncio subprocess. A blocked loop
  would leave an autoscaler tick waiting on a Kubernetes request that SIGTERM cannot interrupt.
- Every wait is bounded: the scenario by --timeout, each broker call by --amqp-timeout, the
  autoscaler's shutdown by --shutdown-timeout (then SIGKILL).
"""

import argparse
import asyncio
import concurrent.futures
import json
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Mapping

import kmock
import pika

NS = "ember"
# The broker the autoscaler uses too (it reads EMBER_AMQP_URL, with the same default).
BROKER = os.environ.get("EMBER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def plain(value):
    """kmock's objects as plain JSON values (it wraps nested mappings)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class Amqp:
    """One pika BlockingConnection, used from one daemon thread only (pika is not thread-safe);
    the event loop awaits each call with a bound. A daemon thread: a call stuck in the broker
    cannot keep the interpreter from exiting."""

    def __init__(self, call_timeout):
        self.call_timeout = call_timeout
        self.calls = queue.Queue()
        self.connection = None
        threading.Thread(target=self._serve, name="pika", daemon=True).start()

    def _serve(self):
        while True:
            fn, future = self.calls.get()
            if fn is None:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as error:  # handed to the awaiting coroutine
                    future.set_exception(error)

    async def call(self, fn, timeout=None):
        future = concurrent.futures.Future()
        self.calls.put((fn, future))
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout or self.call_timeout)

    async def connect(self, deadline):
        """Connects, retrying until the deadline (a loaded broker can be slow to shake hands)."""
        params = pika.URLParameters(
            f"{BROKER}{'&' if '?' in BROKER else '?'}socket_timeout=10&stack_timeout=20&blocked_connection_timeout=20&heartbeat=30")
        while True:
            try:
                self.connection = await self.call(lambda: pika.BlockingConnection(params), timeout=30)
                self.channel = await self.call(self.connection.channel)
                return
            except (pika.exceptions.AMQPError, asyncio.TimeoutError, OSError) as error:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cannot connect to the broker: {error!r}") from error
                print(f"kmock_cluster: broker connection failed ({error!r}); retrying", file=sys.stderr)
                await asyncio.sleep(1)

    async def publish_burst(self, queue_name, exchange, routing_key, count):
        """All `count` jobs in one transaction: they enter the queue together at the commit.
        The queue must exist already (a passive declare), or the jobs would be dropped."""
        def burst():
            self.channel.queue_declare(queue_name, passive=True)
            self.channel.tx_select()
            for i in range(count):
                self.channel.basic_publish(exchange, routing_key, b"\x89PNG not really",
                                           pika.BasicProperties(message_id=f"j{i}", delivery_mode=2))
            self.channel.tx_commit()
        await self.call(burst)

    async def delete_queues(self, names):
        def delete():
            channel = self.connection.channel()
            for name in names:
                channel.queue_delete(name)
            channel.close()
        await self.call(delete)

    async def close(self):
        if self.connection is not None:
            try:
                await self.call(self.connection.close, timeout=5)
            except Exception:
                pass
        self.calls.put((None, None))


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--autoscaler", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=60, help="the scenario, in seconds")
    parser.add_argument("--amqp-timeout", type=float, default=30, help="each broker call")
    parser.add_argument("--shutdown-timeout", type=float, default=10,
                        help="the autoscaler's exit after SIGTERM, before SIGKILL")
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout

    deployments = kmock.resource("apps", "v1", "deployments")
    pools = kmock.resource("ember.dev", "v1alpha1", "inferencepools")
    events = kmock.resource("events.k8s.io", "v1", "events")
    leases = kmock.resource("coordination.k8s.io", "v1", "leases")

    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
        # The scale subresource answers with a Scale, as a real API server does.
        def scale_reply(request):
            replicas = request.data.get("spec", {}).get("replicas", 0)
            return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                    "metadata": {"name": "workers", "namespace": NS},
                    "spec": {"replicas": replicas}, "status": {"replicas": replicas}}
        k8s[kmock.method.PATCH, kmock.subresource("scale")] << scale_reply

        k8s.objects[deployments, NS, "workers"] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "workers", "namespace": NS},
            "spec": {"replicas": 0,
                     "selector": {"matchLabels": {"app": "ember-worker"}},
                     "template": {"metadata": {"labels": {"app": "ember-worker"}},
                                  "spec": {"containers": [{"name": "worker", "image": "ember-worker"}]}}},
            "status": {"replicas": 0, "readyReplicas": 0},
        }
        # An expired lease from a previous holder: the autoscaler must take it over.
        k8s.objects[leases, NS, "ember-autoscaler"] = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "ember-autoscaler", "namespace": NS, "resourceVersion": "1"},
            "spec": {"holderIdentity": "a-previous-replica", "leaseDurationSeconds": 15,
                     "renewTime": "2020-01-01T00:00:00.000000Z", "leaseTransitions": 4},
        }
        k8s.objects[pools, NS, "ssd"] = {
            "apiVersion": "ember.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "ssd", "namespace": NS, "uid": "pool-uid-1"},
            "spec": {"model": {"name": args.model}, "deployment": "workers", "minReplicas": 0,
                     "maxReplicas": 4, "initialServiceRate": 10, "targetDrainTimeSeconds": 5},
        }

        def pool_statuses():
            """Every status the autoscaler wrote on the pool, oldest first."""
            history = k8s.objects[pools, NS, "ssd"].history
            return [plain(v["status"]) for v in history if v is not None and v.get("status")]

        def seen():
            deployment = k8s.objects[deployments, NS, "workers"]
            scaled_up = [s for s in pool_statuses() if s.get("desiredReplicas", 0) >= 1]
            # The status written by the scale-up decision itself, not a later tick's.
            status = scaled_up[0] if scaled_up else (pool_statuses() or [{}])[-1]
            scaled = deployment["spec"]["replicas"] >= 1
            evs = [e for (res, ns, name), e in k8s.objects.items() if res == events]
            lease = [l for (res, ns, name), l in k8s.objects.items() if res == leases]
            taken = lease and lease[0]["spec"].get("holderIdentity") == "autoscaler-under-test"
            done = bool(scaled and scaled_up and evs and taken)
            return done, deployment, status, evs, lease

        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = os.path.join(tmp, "kubeconfig")
            with open(kubeconfig, "w") as f:
                json.dump({
                    "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
                    "clusters": [{"name": "kmock", "cluster": {"server": str(server.url).rstrip("/")}}],
                    "users": [{"name": "kmock", "user": {"token": "test-token"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NS}}],
                }, f)
            log = open(os.path.join(tmp, "autoscaler.log"), "w+")

            def fail(why):
                log.seek(0)
                print(log.read(), file=sys.stderr)
                _, deployment, status, _, _ = seen()
                print(f"kmock_cluster: {why}", file=sys.stderr)
                print(json.dumps({"deployment": plain(deployment), "status": status,
                                  "statuses": pool_statuses()}, default=str), file=sys.stderr)
                sys.exit(1)

            async def until(what, condition, interval=0.02):
                while not condition():
                    if time.monotonic() > deadline:
                        fail(f"timed out after {args.timeout}s waiting for {what}")
                    if proc.returncode is not None:
                        fail(f"the autoscaler exited ({proc.returncode}) while waiting for {what}")
                    await asyncio.sleep(interval)

            # An asyncio subprocess: waiting on it never blocks the loop kmock serves from.
            proc = await asyncio.create_subprocess_exec(
                args.autoscaler, "--backend", "kubernetes", "--namespace", NS, "--tick", "200ms",
                "--admin-addr", "127.0.0.1:0", "--identity", "autoscaler-under-test",
                env={**os.environ, "KUBECONFIG": kubeconfig, "EMBER_LOG": "info,kube=warn"},
                stdout=asyncio.subprocess.DEVNULL, stderr=log)
            amqp = Amqp(args.amqp_timeout)
            jobs_queue = f"ember.jobs.{args.model}"
            hung = False
            try:
                await amqp.connect(deadline)
                # The autoscaler's first status on the pool: it took the lease, declared the
                # model's queue and measured it empty (the status is a tick's last step).
                await until("the autoscaler's first reading of the queue", pool_statuses, 0.005)
                first = pool_statuses()[0]
                if first.get("readyJobs") != 0 or first.get("desiredReplicas") != 0:
                    fail(f"the first reading is not an empty queue at zero replicas: {first}")
                # At once, so the burst lands well before the next reading (one tick later):
                # the autoscaler sees 0 jobs, then all of them, and measures their arrival.
                await amqp.publish_burst(jobs_queue, "ember.jobs", args.model, args.jobs)

                await until("the scale-up", lambda: seen()[0], 0.05)
                _, deployment, status, evs, lease = seen()
                print(json.dumps({
                    "replicas": deployment["spec"]["replicas"],
                    "status": status,
                    "event": {k: evs[0].raw.get(k) for k in ("reason", "action", "note", "type", "regarding")},
                    "lease_holder": lease[0]["spec"]["holderIdentity"],
                    "lease_transitions": lease[0]["spec"].get("leaseTransitions"),
                    "requests": len(k8s),
                }, default=str))
            except SystemExit:
                raise
            except BaseException:
                log.seek(0)
                print(log.read(), file=sys.stderr)
                raise
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), args.shutdown_timeout)
                    except asyncio.TimeoutError:
                        print(f"kmock_cluster: the autoscaler ignored SIGTERM for "
                              f"{args.shutdown_timeout}s; killing it", file=sys.stderr)
                        proc.kill()
                        await asyncio.wait_for(proc.wait(), 5)
                        hung = True
                if amqp.connection is not None:
                    try:
                        await amqp.delete_queues([f"ember.{kind}.{args.model}"
                                                  for kind in ("jobs", "dead", "retry", "deadnotice")])
                    except Exception as error:
                        print(f"kmock_cluster: queue cleanup failed: {error!r}", file=sys.stderr)
                await amqp.close()
            if hung:
                sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
