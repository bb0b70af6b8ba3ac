#!/usr/bin/env python3
"""Drives the real ember-autoscaler binary (kubernetes backend) through two model rollouts against
kmock's Kubernetes API emulator over HTTP, with a kubeconfig pointing at it; this script plays the
Deployment controller.

Seeds a worker Deployment whose template carries model version 1 and an InferencePool asking for
version 1, starts the autoscaler and waits until it has adopted version 1 (status.model.current,
no template write). Then:

1. spec.model -> version 2: the autoscaler patches the template (JSON Patch); the "controller"
   bumps the generation, starts one surge pod on the new template, and half a second later
   reports every replica updated and available; the autoscaler reports Progressing, then
   Complete, with an Event each.
2. spec.model -> version 3 with progressDeadlineSeconds 3: version 3's pod never becomes ready
   (the old ones stay, maxUnavailable 0); after the deadline the autoscaler patches the template
   back to version 2, reports RolledBack with the failed source, posts a Warning Event, and does
   not try version 3 again (watched for 1.5 s more, several ticks).

Prints what was seen as JSON (the phases the pool's status went through, the template versions the
Deployment went through, the Events, the final status.model, the generations); exits 1 with the
autoscaler's log if the scenario does not complete within --timeout.

The event loop never blocks (kmock serves the autoscaler from it): pika runs on its own thread
(kmock_cluster.Amqp) and the autoscaler is an asyncio subprocess; every wait is bounded.
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

import kmock

from kmock_cluster import NS, Amqp, plain

# Versions whose new pods load and become ready; any other never does.
GOOD = {"1", "2"}
VERSION_ENV = "EMBER_WORKER_MODEL_VERSION"


def source(model, version):
    return {"uri": f"https://models.example/{model}/{version}.tar.gz",
            "sha256": (version * 64)[:64], "version": version}


def env_of(deployment):
    (worker,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"]
    return {e["name"]: e.get("value") for e in worker.get("env", [])}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--autoscaler", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--timeout", type=float, default=90, help="the scenario, in seconds")
    parser.add_argument("--amqp-timeout", type=float, default=30, help="each broker call")
    parser.add_argument("--shutdown-timeout", type=float, default=10,
                        help="the autoscaler's exit after SIGTERM, before SIGKILL")
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout

    deployments = kmock.resource("apps", "v1", "deployments")
    pools = kmock.resource("ember.dev", "v1alpha1", "inferencepools")
    events = kmock.resource("events.k8s.io", "v1", "events")
    v1 = source(args.model, "1")

    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
        key = (deployments, NS, "workers")

        # A real API server bumps metadata.generation on every spec change: so does this one, in
        # the answer to the template patch itself (the scale subresource is left alone).
        def bump_generation(request):
            deployment = k8s.objects[key]
            deployment.patch({"metadata": {"generation": deployment["metadata"]["generation"] + 1}})
            return deployment.raw
        k8s[kmock.method.PATCH, deployments, kmock.subresource(None)] << bump_generation

        def scale_reply(request):
            replicas = request.data.get("spec", {}).get("replicas", 0)
            return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                    "metadata": {"name": "workers", "namespace": NS},
                    "spec": {"replicas": replicas}, "status": {"replicas": replicas}}
        k8s[kmock.method.PATCH, kmock.subresource("scale")] << scale_reply

        k8s.objects[key] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "workers", "namespace": NS, "generation": 1},
            "spec": {"replicas": 2,
                     "selector": {"matchLabels": {"app": "ember-worker"}},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": {"labels": {"app": "ember-worker"}},
                                  "spec": {"containers": [{"name": "worker", "image": "ember-worker", "env": [
                                      {"name": "EMBER_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                      {"name": "EMBER_WORKER_MODEL_URI", "value": v1["uri"]},
                                      {"name": "EMBER_WORKER_MODEL_SHA256", "value": v1["sha256"]},
                                      {"name": VERSION_ENV, "value": "1"},
                                  ]}]}}},
            "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                       "readyReplicas": 2, "availableReplicas": 2},
        }
        # Two replicas, pinned: this scenario is about the template, not the scale.
        k8s.objects[pools, NS, "ssd"] = {
            "apiVersion": "ember.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "ssd", "namespace": NS, "uid": "pool-uid-1"},
            "spec": {"model": {"name": args.model, **v1}, "deployment": "workers",
                     "minReplicas": 2, "maxReplicas": 2, "rollout": {"progressDeadlineSeconds": 30}},
        }

        async def controller():
            """The Deployment controller: at each new generation, one surge pod on the new
            template beside the old ones; a good version's pods are ready half a second later
            and the old ones go."""
            seen = 1
            while True:
                deployment = k8s.objects[key]
                generation = deployment["metadata"]["generation"]
                if generation != seen:
                    seen = generation
                    replicas = deployment["spec"]["replicas"]
                    deployment.patch({"status": {
                        "observedGeneration": generation, "replicas": replicas + 1, "updatedReplicas": 1,
                        "readyReplicas": replicas, "availableReplicas": replicas}})
                    if env_of(deployment).get(VERSION_ENV) in GOOD:
                        await asyncio.sleep(0.5)
                        if k8s.objects[key]["metadata"]["generation"] == generation:
                            k8s.objects[key].patch({"status": {
                                "observedGeneration": generation, "replicas": replicas,
                                "updatedReplicas": replicas, "readyReplicas": replicas,
                                "availableReplicas": replicas}})
                await asyncio.sleep(0.02)

        def model_status():
            status = k8s.objects[pools, NS, "ssd"].get("status") or {}
            return plain(status.get("model") or {})

        def rollout():
            return model_status().get("rollout") or {}

        def phases():
            """(version, phase) of every status the autoscaler wrote, repeats dropped."""
            seen = []
            for v in k8s.objects[pools, NS, "ssd"].history:
                r = ((v or {}).get("status") or {}).get("model", {}).get("rollout") if v else None
                if r:
                    step = f"{r.get('version')}:{r.get('phase')}"
                    if not seen or seen[-1] != step:
                        seen.append(step)
            return seen

        def templates():
            """The template's model version through the Deployment's history, repeats dropped."""
            seen = []
            for v in k8s.objects[key].history:
                if v is not None:
                    version = env_of(plain(v)).get(VERSION_ENV)
                    if not seen or seen[-1] != version:
                        seen.append(version)
            return seen

        def posted():
            evs = [plain(e.raw) for (res, _, _), e in k8s.objects.items() if res == events]
            evs.sort(key=lambda e: e.get("eventTime", ""))
            return [{k: e.get(k) for k in ("reason", "type", "action", "note")} for e in evs]

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
                print(f"kmock_rollout: {why}", file=sys.stderr)
                print(json.dumps({"phases": phases(), "templates": templates(), "events": posted(),
                                  "model": model_status(), "deployment": plain(k8s.objects[key].raw)},
                                 default=str), file=sys.stderr)
                sys.exit(1)

            async def until(what, condition, interval=0.05):
                while not condition():
                    if time.monotonic() > deadline:
                        fail(f"timed out after {args.timeout}s waiting for {what}")
                    if proc.returncode is not None:
                        fail(f"the autoscaler exited ({proc.returncode}) while waiting for {what}")
                    await asyncio.sleep(interval)

            play = asyncio.create_task(controller())
            proc = await asyncio.create_subprocess_exec(
                args.autoscaler, "--backend", "kubernetes", "--namespace", NS, "--tick", "200ms",
                "--admin-addr", "127.0.0.1:0", "--identity", "autoscaler-under-test",
                env={**os.environ, "KUBECONFIG": kubeconfig, "EMBER_LOG": "info,kube=warn"},
                stdout=asyncio.subprocess.DEVNULL, stderr=log)
            amqp = Amqp(args.amqp_timeout)
            hung = False
            try:
                await amqp.connect(deadline)
                # Version 1 adopted: the template already carries it, so nothing is written.
                await until("version 1 adopted", lambda: model_status().get("current", {}).get("version") == "1")
                adopted_generation = k8s.objects[key]["metadata"]["generation"]

                k8s.objects[pools, NS, "ssd"].patch({"spec": {"model": source(args.model, "2")}})
                await until("version 2 rolled out",
                            lambda: rollout().get("version") == "2" and rollout().get("phase") == "Complete")

                k8s.objects[pools, NS, "ssd"].patch({"spec": {"model": source(args.model, "3"),
                                                              "rollout": {"progressDeadlineSeconds": 3}}})
                await until("version 3 rolled back",
                            lambda: rollout().get("version") == "3" and rollout().get("phase") == "RolledBack")
                rolled_back_generation = k8s.objects[key]["metadata"]["generation"]
                # Several ticks more: version 3 is not tried again.
                await asyncio.sleep(1.5)
                print(json.dumps({
                    "phases": phases(),
                    "templates": templates(),
                    "events": posted(),
                    "model": model_status(),
                    "adopted_generation": adopted_generation,
                    "rolled_back_generation": rolled_back_generation,
                    "final_generation": k8s.objects[key]["metadata"]["generation"],
                    "final_template_version": env_of(k8s.objects[key]).get(VERSION_ENV),
                }, default=str))
            except SystemExit:
                raise
            except BaseException:
                log.seek(0)
                print(log.read(), file=sys.stderr)
                raise
            finally:
                play.cancel()
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), args.shutdown_timeout)
                    except asyncio.TimeoutError:
                        print(f"kmock_rollout: the autoscaler ignored SIGTERM for "
                              f"{args.shutdown_timeout}s; killing it", file=sys.stderr)
                        proc.kill()
                        await asyncio.wait_for(proc.wait(), 5)
                        hung = True
                if amqp.connection is not None:
                    queues = [f"ember.{kind}.{args.model}" for kind in ("jobs", "dead", "retry", "deadnotice")]
                    queues += [f"ember.jobs.{args.model}@{v}" for v in ("1", "2", "3")]
                    try:
                        await amqp.delete_queues(queues)
                    except Exception as error:
                        print(f"kmock_rollout: queue cleanup failed: {error!r}", file=sys.stderr)
                await amqp.close()
            if hung:
                sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
