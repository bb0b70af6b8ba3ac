#!/usr/bin/env python3
"""Drives the real ember-autoscaler binary (kubernetes backend) against kmock's Kubernetes API
emulator over HTTP, with a kubeconfig pointing at it, and RabbitMQ for the jobs.

Seeds a Deployment and an InferencePool, starts the autoscaler, publishes jobs to the model's
queue (no worker runs, so they wait), and waits until the emulator holds: the Deployment
scaled up, the pool's status written, a ScaledUp Event, and the leader Lease. Prints the
observed objects as JSON; exits 1 with the autoscaler's log if they never show up.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import kmock
import pika

NS = "ember"


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--autoscaler", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()

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
            "spec": {"model": args.model, "deployment": "workers", "minReplicas": 0,
                     "maxReplicas": 4, "initialServiceRate": 10, "targetDrainTimeSeconds": 5},
        }

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
            proc = subprocess.Popen(
                [args.autoscaler, "--backend", "kubernetes", "--namespace", NS, "--tick", "200ms",
                 "--admin-addr", "127.0.0.1:0", "--identity", "autoscaler-under-test"],
                env={**os.environ, "KUBECONFIG": kubeconfig, "EMBER_LOG": "info,kube=warn"},
                stdout=subprocess.DEVNULL, stderr=log)
            try:
                # Publish the jobs once the autoscaler has declared the queue.
                connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F"))
                channel = connection.channel()
                deadline = time.monotonic() + args.timeout
                while True:
                    try:
                        channel.queue_declare(f"ember.jobs.{args.model}", passive=True)
                        break
                    except pika.exceptions.ChannelClosedByBroker:
                        channel = connection.channel()
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                for i in range(args.jobs):
                    channel.basic_publish("ember.jobs", args.model, b"\x89PNG not really",
                                          pika.BasicProperties(message_id=f"j{i}", delivery_mode=2))

                def seen():
                    deployment = k8s.objects[deployments, NS, "workers"]
                    pool = k8s.objects[pools, NS, "ssd"]
                    status = pool.get("status") or {}
                    scaled = deployment["spec"]["replicas"] >= 1
                    evs = [e for (res, ns, name), e in k8s.objects.items() if res == events]
                    lease = [l for (res, ns, name), l in k8s.objects.items() if res == leases]
                    taken = lease and lease[0]["spec"].get("holderIdentity") == "autoscaler-under-test"
                    return scaled and status.get("desiredReplicas", 0) >= 1 and evs and taken, deployment, status, evs, lease

                while True:
                    done, deployment, status, evs, lease = seen()
                    if done:
                        break
                    if time.monotonic() > deadline or proc.poll() is not None:
                        log.seek(0)
                        print(log.read(), file=sys.stderr)
                        print(json.dumps({"deployment": dict(deployment), "status": dict(status)}), file=sys.stderr)
                        sys.exit(1)
                    await asyncio.sleep(0.2)
                channel.queue_purge(f"ember.jobs.{args.model}")
                channel.queue_delete(f"ember.jobs.{args.model}")
                channel.queue_delete(f"ember.dead.{args.model}")
                connection.close()
                print(json.dumps({
                    "replicas": deployment["spec"]["replicas"],
                    "status": dict(status),
                    "event": {k: evs[0].raw.get(k) for k in ("reason", "action", "note", "type", "regarding")},
                    "lease_holder": lease[0]["spec"]["holderIdentity"],
                    "lease_transitions": lease[0]["spec"].get("leaseTransitions"),
                    "requests": len(k8s),
                }, default=str))
            except BaseException:
                log.seek(0)
                print(log.read(), file=sys.stderr)
                raise
            finally:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
