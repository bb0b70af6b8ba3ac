"""The Kubernetes manifests: rendered by kustomize, validated by kubernetes-validate (built-in
schemas), CRD-typed objects against their CRD schemas, and Ember's deployment policies."""

import copy
import json
import re
import tempfile

import jsonschema
import pytest
import yaml

from conftest import (HA_OVERLAYS, K8S_VERSIONS, KEDA_OVERLAYS, MODEL_STORE_OVERLAYS, NODE_MODULES, OVERLAYS, POOL_OVERLAYS, ROOT, find,
                      pod_spec, render, render_text, run, tool)
from secure_defaults import Endpoint, Network, _file_source, k8s_violations

# Kinds kubernetes-validate has no schema for; each is validated against its CRD schema below.
CRD_KINDS = {"InferencePool", "ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject"}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
# Secrets the manifests reference (mounted as files, never env) but do not contain: docs/deploy.md
# has the user create them.
REQUIRED_SECRETS = {
    "ember-tenants": {"tenants.toml"},
    "ember-callback": {"secret"},
    "ember-redis": {"password", "url"},
    "ember-rabbitmq-admin": {"password"},
    "ember-amqp-dispatcher": {"password", "url"},
    "ember-amqp-worker": {"password", "url"},
    "ember-amqp-autoscaler": {"password", "url"},
}
# And those of a three-node broker (manifests/components/ha-broker): the nodes' shared Erlang cookie.
HA_SECRETS = {"ember-rabbitmq-erlang-cookie": {"cookie"}}
# Pods of the user's own that the dispatcher's NetworkPolicy admits (none in the manifests).
CLIENT_LABEL = {"ember.dev/client": "true"}
# The one container allowed to run as root: NVIDIA's device plugin writes its socket into the
# kubelet's hostPath directory (upstream runs it as root too).
ROOT_EXEMPT = {("kube-system", "nvidia-device-plugin-daemonset")}
# Exactly the Kubernetes calls autoscaler/src/kubernetes.rs makes (docs/autoscaling.md).
EXPECTED_RULES = {
    ("ember.dev", "inferencepools", (), ("get", "list", "watch")),
    ("ember.dev", "inferencepools/status", (), ("patch",)),
    ("apps", "deployments", (), ("get", "patch")),
    ("apps", "deployments/scale", (), ("patch",)),
    ("", "pods", (), ("list", "patch")),
    ("events.k8s.io", "events", (), ("create",)),
    ("coordination.k8s.io", "leases", (), ("create",)),
    ("coordination.k8s.io", "leases", ("ember-autoscaler",), ("get", "patch")),
}


def workloads(objs):
    return [o for o in objs if pod_spec(o) is not None]


def containers(spec):
    return spec.get("initContainers", []) + spec["containers"]


def ns(obj):
    return obj["metadata"].get("namespace")


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        assert m.start() == pos, f"cannot parse duration {text!r}"
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    assert pos == len(text) and pos, f"cannot parse duration {text!r}"
    return total


def arg_or_env(container, flag, env, default):
    args = container.get("args", []) + container.get("command", [])[1:]
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    e = env_of(container).get(env)
    if e is not None:
        assert "value" in e, f"{env} must be a literal value to be checkable"
        return e["value"]
    return default


def worker(objs):
    (dep,) = find(objs, "Deployment", "ember-worker-ssdlite-person")
    return dep, dep["spec"]["template"]["spec"]["containers"][0]


# --- rendering and schema validation ---------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict(overlay, version, tmp_path):
    path = tmp_path / "rendered.yaml"
    path.write_text(render_text(overlay))
    proc = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every kind it had no schema for must be one that is validated against its CRD below.
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", proc.stdout + proc.stderr))
    assert unknown <= CRD_KINDS, f"kinds validated by nothing: {unknown - CRD_KINDS}"


def test_kubernetes_validate_rejects_a_bad_object(tmp_path):
    """Negative control: the validator really runs strict (an unknown field fails)."""
    objs = render("overlays/cpu")
    dep, _ = worker(objs)
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 35
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSIONS[0], str(path)])
    assert proc.returncode != 0 and "terminationGracePeriodSecond" in proc.stdout + proc.stderr


def crd_schema():
    crd = yaml.safe_load((ROOT / "manifests/base/crd-inferencepool.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    return crd, version["name"], version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("overlay", POOL_OVERLAYS)
def test_inferencepools_match_the_crd_schema(overlay):
    crd, version, schema = crd_schema()
    pools = find(render(overlay), crd["spec"]["names"]["kind"])
    for pool in pools:
        assert pool["apiVersion"] == f"{crd['spec']['group']}/{version}"
        jsonschema.validate({k: v for k, v in pool.items() if k in ("spec", "status")}, schema)
    broken = copy.deepcopy(pools[0])
    del broken["spec"]["maxReplicas"]
    broken["spec"]["minReplicas"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"spec": broken["spec"]}, schema)


KEDA_CRD = ROOT / "tests/deploy/keda/keda.sh_scaledobjects.yaml"


def keda_schema():
    """KEDA's published ScaledObject CRD (tests/deploy/keda/PROVENANCE.md): its served version's schema."""
    crd = yaml.safe_load(KEDA_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    return crd, version["name"], version["schema"]["openAPIV3Schema"]


def unknown_fields(obj, schema, path=""):
    """Fields of `obj` that `schema` does not declare: what the API server's strict field
    validation rejects (jsonschema alone lets them through, as CRD schemas set no
    additionalProperties: false)."""
    if "anyOf" in schema or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(obj, dict) and "properties" in schema:
        found = []
        for key, value in obj.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
        return found
    if isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [f for k, v in obj.items() for f in unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")]
    if isinstance(obj, list) and "items" in schema:
        return [f for i, v in enumerate(obj) for f in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


def check_scaledobject(obj, schema):
    jsonschema.validate({k: v for k, v in obj.items() if k in ("spec", "status")}, schema)
    assert unknown_fields({"spec": obj["spec"]}, schema) == []
    # The CRD's one CEL rule (x-kubernetes-validations), which jsonschema does not run.
    spec = obj["spec"]
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), "minReplicaCount > maxReplicaCount"


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_scaledobjects_match_kedas_published_crd_schema(overlay):
    crd, version, schema = keda_schema()
    assert crd["metadata"]["name"] == "scaledobjects.keda.sh"
    objs = find(render(overlay), crd["spec"]["names"]["kind"])
    for obj in objs:
        assert obj["apiVersion"] == f"{crd['spec']['group']}/{version}"
        check_scaledobject(obj, schema)
    # Negative controls: each of these is an error the schema check must catch.
    breakages = [
        lambda spec: spec.pop("scaleTargetRef"),
        lambda spec: spec["triggers"][0].pop("metadata"),
        lambda spec: spec.__setitem__("minReplicaCount", -1),
        lambda spec: spec.__setitem__("pollingInterval", "5s"),
        lambda spec: spec["triggers"][0]["metadata"].__setitem__("maxReplicas", 8),
        lambda spec: spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"].__setitem__("stabilizationWindow", 0),
        lambda spec: spec.__setitem__("minReplicaCount", 9),
    ]
    for i, breakage in enumerate(breakages):
        broken = copy.deepcopy(objs[0])
        breakage(broken["spec"])
        with pytest.raises((jsonschema.ValidationError, AssertionError)):
            check_scaledobject(broken, schema)
            pytest.fail(f"breakage {i} passed the schema check")


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_keda_overlay_runs_the_autoscaler_signal_only_for_what_the_scaledobject_asks(overlay):
    objs = render(overlay)
    (so,) = find(objs, "ScaledObject")
    (dep,) = find(objs, "Deployment", "ember-autoscaler")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = env_of(c)
    # Signal-only: no scaling of its own, hence no Role, no Lease, no API token, no pools.
    assert arg_or_env(c, "--backend", "EMBER_AUTOSCALER_BACKEND", "local") == "signal"
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "InferencePool")]
    assert not [o for o in objs if o["kind"] == "CustomResourceDefinition"]
    (sa,) = find(objs, "ServiceAccount", spec["serviceAccountName"])
    assert spec["automountServiceAccountToken"] is False and sa["automountServiceAccountToken"] is False
    # The ScaledObject scales the model's worker Deployment, which nothing else sizes.
    target = so["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    (workers,) = find(objs, "Deployment", target["name"])
    assert "replicas" not in workers["spec"], "spec.replicas would fight the HPA on every apply"
    assert ns(so) == ns(workers) == ns(dep) == "ember"
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] in ("external-push", "external")
    # The metric is replicas against a target of 1: only AverageValue makes the HPA's count the value.
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    model = trigger["metadata"]["model"]
    assert workers["spec"]["template"]["metadata"]["labels"]["ember.dev/model"] == model
    assert model in env["EMBER_AUTOSCALER_SIGNAL_MODELS"]["value"].split(",")
    assert so["spec"]["maxReplicaCount"] == int(env["EMBER_AUTOSCALER_MAX_REPLICAS"]["value"])
    assert so["spec"].get("minReplicaCount", 0) == int(env["EMBER_AUTOSCALER_MIN_REPLICAS"]["value"])
    # scalerAddress -> the Service -> the container port the autoscaler listens on.
    host, port = trigger["metadata"]["scalerAddress"].rsplit(":", 1)
    name, namespace, *rest = host.split(".")
    assert namespace == ns(dep) and rest in ([], ["svc"], ["svc", "cluster", "local"]), host
    (svc,) = find(objs, "Service", name)
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (container_port,) = [p for p in c["ports"] if p["name"] == svc_port["targetPort"]]
    assert env["EMBER_AUTOSCALER_KEDA_LISTEN"]["value"] == f"0.0.0.0:{container_port['containerPort']}"


def test_crd_equals_the_autoscalers_print_crd():
    proc = run([str(ROOT / "target/debug/ember-autoscaler"), "--print-crd"])
    assert proc.returncode == 0, proc.stderr
    assert (ROOT / "manifests/base/crd-inferencepool.yaml").read_text() == proc.stdout


@pytest.mark.parametrize("overlay", ["overlays/cpu-monitoring", "overlays/gpu-monitoring"])
def test_monitoring_objects_match_the_operator_crd_schemas(overlay, tmp_path):
    objs = [o for o in render(overlay) if o["kind"] in MONITORING_KINDS]
    assert {o["kind"] for o in objs} == MONITORING_KINDS
    path = tmp_path / "objs.json"
    path.write_text(json.dumps(objs))
    proc = run(["node", str(ROOT / "tests/deploy/validate_monitoring.mjs"), str(NODE_MODULES), str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Negative control: a wrongly typed field fails.
    bad = copy.deepcopy(find(objs, "ServiceMonitor")[0])
    bad["spec"]["endpoints"][0]["interval"] = "every 15 seconds"
    path.write_text(json.dumps([bad]))
    proc = run(["node", str(ROOT / "tests/deploy/validate_monitoring.mjs"), str(NODE_MODULES), str(path)])
    assert proc.returncode == 1 and "interval" in proc.stdout


@pytest.mark.parametrize("overlay", ["base", "overlays/cpu", "overlays/gpu"])
def test_plain_overlays_need_no_prometheus_operator(overlay):
    assert not [o for o in render(overlay) if o["apiVersion"].startswith("monitoring.coreos.com")]


# --- policies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down_with_requests_and_limits(overlay):
    for obj in workloads(render(overlay)):
        spec, key = pod_spec(obj), (ns(obj), obj["metadata"]["name"])
        pod_sc = spec.get("securityContext", {})
        for c in containers(spec):
            where = f"{obj['kind']}/{key[1]} container {c['name']}"
            sc = c.get("securityContext", {})
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{where}: {part} need cpu and memory"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            if key in ROOT_EXEMPT:
                continue
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{where}: runAsUser must be a non-zero uid"
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("privileged") is not True, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ember_containers_probe_livez_and_readyz(overlay):
    for name in ("ember-worker-ssdlite-person", "ember-dispatcher", "ember-autoscaler"):
        (dep,) = find(render(overlay), "Deployment", name)
        c = dep["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
            get = c[probe]["httpGet"]
            assert get["path"] == path and get["port"] == "admin" and "admin" in ports, f"{name} {probe}"


def test_gpu_overlay_worker_gets_exactly_one_gpu():
    objs = render("overlays/gpu")
    dep, c = worker(objs)
    spec = dep["spec"]["template"]["spec"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert arg_or_env(c, "--device", "EMBER_WORKER_DEVICE", "cpu") == "cuda"
    assert c["image"].rsplit(":", 1)[0].endswith("/ember-worker-cuda")
    (rc,) = find(objs, "RuntimeClass", "nvidia")
    assert rc["handler"] == "nvidia"
    (ds,) = find(objs, "DaemonSet", "nvidia-device-plugin-daemonset")
    image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"nvcr\.io/nvidia/k8s-device-plugin:v\d+\.\d+\.\d+", image), image
    # No other container in the namespace asks for a GPU.
    for obj in workloads(objs):
        for other in containers(pod_spec(obj)):
            if other is not c:
                assert "nvidia.com/gpu" not in json.dumps(other.get("resources", {})), obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", ["base", "overlays/cpu", "overlays/cpu-monitoring"])
def test_cpu_worker_asks_for_no_gpu(overlay):
    objs = render(overlay)
    _, c = worker(objs)
    assert arg_or_env(c, "--device", "EMBER_WORKER_DEVICE", "cpu") == "cpu"
    assert "nvidia" not in render_text(overlay)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_periods_exceed_drain_timeouts(overlay):
    objs = render(overlay)
    for name, flag, env, default in (
        ("ember-worker-ssdlite-person", "--drain-timeout", "EMBER_WORKER_DRAIN_TIMEOUT", "25s"),
        ("ember-dispatcher", "--drain-timeout", "EMBER_DISPATCHER_DRAIN_TIMEOUT", "20s"),
    ):
        (dep,) = find(objs, "Deployment", name)
        spec = dep["spec"]["template"]["spec"]
        drain = parse_duration(arg_or_env(spec["containers"][0], flag, env, default))
        assert spec["terminationGracePeriodSeconds"] > drain, f"{name}: grace <= drain {drain}s"


@pytest.mark.parametrize("overlay", POOL_OVERLAYS)
def test_worker_is_identified_by_pod_name_and_scaled_by_the_autoscaler(overlay):
    objs = render(overlay)
    dep, c = worker(objs)
    assert "replicas" not in dep["spec"], "spec.replicas would fight the autoscaler on every apply"
    assert env_of(c)["EMBER_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (pool,) = find(objs, "InferencePool")
    assert pool["spec"]["deployment"] == dep["metadata"]["name"]
    assert labels["ember.dev/model"] == pool["spec"]["model"]["name"]
    assert ns(pool) == ns(dep) == "ember"


@pytest.mark.parametrize("overlay", POOL_OVERLAYS)
def test_worker_caches_models_on_a_volume_and_leaves_the_source_to_the_pool(overlay):
    objs = render(overlay)
    dep, c = worker(objs)
    env = env_of(c)
    cache = env["EMBER_WORKER_MODEL_CACHE_DIR"]["value"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == cache]
    (volume,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume or "ephemeral" in volume, volume
    # The version the template carries is the pool's, so that applying both rolls nothing.
    (pool,) = find(objs, "InferencePool")
    assert env["EMBER_WORKER_MODEL_VERSION"]["value"] == pool["spec"]["model"]["version"]
    # A source named by the pool (EMBER_WORKER_MODEL_URI) conflicts with a model directory given
    # here: the image's own is the default.
    assert "EMBER_WORKER_MODEL_DIR" not in env and "EMBER_WORKER_MODEL_URI" not in env
    # New pods ready before old ones go (the autoscaler keeps it so at every rollout).
    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate" and rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1


@pytest.mark.parametrize("overlay", MODEL_STORE_OVERLAYS)
def test_model_store_workers_get_a_web_identity_and_no_api_token(overlay):
    objs = render(overlay)
    dep, c = worker(objs)
    spec = dep["spec"]["template"]["spec"]
    (sa,) = find(objs, "ServiceAccount", spec["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False and spec["automountServiceAccountToken"] is False
    env = env_of(c)
    token = env["AWS_WEB_IDENTITY_TOKEN_FILE"]["value"]
    (mount,) = [m for m in c["volumeMounts"] if token.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount.get("readOnly") is True and not mount.get("subPath")
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    (source,) = volume["projected"]["sources"]
    projected = source["serviceAccountToken"]
    assert projected["audience"] == "sts.amazonaws.com" and projected["path"] == token.rsplit("/", 1)[1]
    assert projected["expirationSeconds"] <= 86400
    for name in ("AWS_ROLE_ARN", "AWS_REGION"):
        assert env[name]["valueFrom"]["configMapKeyRef"]["name"] == "ember-model-store", name
    # No static keys anywhere: not in env, not from a Secret.
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    assert not [s for s in c.get("envFrom", []) if "secretRef" in s]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_pod_labels(overlay):
    objs = render(overlay)
    pods = [(ns(o), o["spec"]["template"]["metadata"]["labels"], o) for o in workloads(objs)]

    def matching(namespace, selector):
        return [o for n, labels, o in pods if n == namespace and selector.items() <= labels.items()]

    for obj in workloads(objs):
        sel = obj["spec"]["selector"]["matchLabels"]
        assert sel.items() <= obj["spec"]["template"]["metadata"]["labels"].items(), obj["metadata"]["name"]
    for svc in (o for o in objs if o["kind"] == "Service"):
        targets = matching(ns(svc), svc["spec"]["selector"])
        assert targets, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            tp = port.get("targetPort", port["port"])
            for t in targets:
                cports = [p for c in pod_spec(t)["containers"] for p in c.get("ports", [])]
                assert any(p.get("name") == tp or p["containerPort"] == tp for p in cports), (
                    f"Service {svc['metadata']['name']} port {tp} not on {t['metadata']['name']}"
                )
    for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
        assert matching(ns(pdb), pdb["spec"]["selector"]["matchLabels"]), f"PDB {pdb['metadata']['name']}"
    for np in (o for o in objs if o["kind"] == "NetworkPolicy"):
        sel = np["spec"]["podSelector"].get("matchLabels", {})
        assert sel == CLIENT_LABEL or matching(ns(np), sel), f"NetworkPolicy {np['metadata']['name']} selects no pods"
        rules = np["spec"].get("ingress", []) + np["spec"].get("egress", [])
        for peer in (p for rule in rules for p in rule.get("from", []) + rule.get("to", [])):
            if "podSelector" in peer and "namespaceSelector" not in peer and peer["podSelector"].get("matchLabels") != CLIENT_LABEL:
                assert matching(ns(np), peer["podSelector"].get("matchLabels", {})), np["metadata"]["name"]
    # Every Ember component has a PDB.
    pdb_names = {o["metadata"]["name"] for o in objs if o["kind"] == "PodDisruptionBudget"}
    assert {"ember-dispatcher", "ember-autoscaler", "ember-worker-ssdlite-person"} <= pdb_names


@pytest.mark.parametrize("overlay", ["overlays/cpu-monitoring", "overlays/gpu-monitoring"])
def test_monitors_select_pods_and_ports(overlay):
    objs = render(overlay)
    for mon in (o for o in objs if o["kind"] in ("PodMonitor", "ServiceMonitor")):
        sel = mon["spec"]["selector"]["matchLabels"]
        if mon["kind"] == "PodMonitor":
            targets = [o for o in workloads(objs) if ns(o) == ns(mon) and sel.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
            names = {p["name"] for t in targets for c in pod_spec(t)["containers"] for p in c.get("ports", [])}
            endpoints = mon["spec"]["podMetricsEndpoints"]
        else:
            targets = [o for o in objs if o["kind"] == "Service" and ns(o) == ns(mon) and sel.items() <= o["metadata"].get("labels", {}).items()]
            names = {p["name"] for t in targets for p in t["spec"]["ports"]}
            endpoints = mon["spec"]["endpoints"]
        assert targets, f"{mon['kind']} {mon['metadata']['name']} selects nothing"
        for ep in endpoints:
            assert ep["port"] in names, f"{mon['metadata']['name']}: no port {ep['port']}"


@pytest.mark.parametrize("overlay", POOL_OVERLAYS)
def test_autoscaler_uses_the_bound_service_account_and_exact_rbac(overlay):
    objs = render(overlay)
    (dep,) = find(objs, "Deployment", "ember-autoscaler")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    sa = spec["serviceAccountName"]
    find(objs, "ServiceAccount", sa)
    bindings = [b for b in find(objs, "RoleBinding") if {"kind": "ServiceAccount", "name": sa, "namespace": ns(dep)} in b["subjects"]]
    assert len(bindings) == 1, "the autoscaler's ServiceAccount must be bound to its Role"
    ref = bindings[0]["roleRef"]
    assert ref["kind"] == "Role" and ref["apiGroup"] == "rbac.authorization.k8s.io"
    (role,) = find(objs, "Role", ref["name"])
    assert ns(role) == ns(bindings[0]) == ns(dep)
    got = {
        (g, r, tuple(rule.get("resourceNames", [])), tuple(sorted(rule["verbs"])))
        for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert got == EXPECTED_RULES
    assert sum(len(r["apiGroups"]) * len(r["resources"]) for r in role["rules"]) == len(EXPECTED_RULES)
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert arg_or_env(c, "--backend", "EMBER_AUTOSCALER_BACKEND", "local") == "kubernetes"
    env = env_of(c)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["EMBER_AUTOSCALER_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_and_secret_references_resolve(overlay):
    objs = render(overlay)
    configmaps = {(ns(o), o["metadata"]["name"]): o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    assert not [o for o in objs if o["kind"] == "Secret"], "no credentials in the manifests"
    used_secrets = {}
    for obj in workloads(objs):
        spec = pod_spec(obj)
        for c in containers(spec):
            defined = set()
            for e in c.get("env", []):
                for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                    assert ref in defined, f"{c['name']}: {e['name']} uses $({ref}) before it is defined"
                src = e.get("valueFrom", {})
                if "configMapKeyRef" in src:
                    r = src["configMapKeyRef"]
                    assert r["key"] in configmaps.get((ns(obj), r["name"]), {}), f"{c['name']}: {r}"
                assert "secretKeyRef" not in src, f"{c['name']}: {e['name']} reads a Secret into env"
                defined.add(e["name"])
            mounted = {m["name"] for m in c.get("volumeMounts", [])}
            for v in spec.get("volumes", []):
                if v["name"] not in mounted:
                    continue
                sources = [v] if "secret" in v or "configMap" in v else v.get("projected", {}).get("sources", [])
                for s in sources:
                    if "configMap" in s:
                        r = s["configMap"]
                        data = configmaps.get((ns(obj), r["name"]))
                        assert data is not None, f"{c['name']}: no ConfigMap {r['name']}"
                        assert {i["key"] for i in r.get("items", [])} <= set(data), f"{c['name']}: {r}"
                    if "secret" in s:
                        r = s["secret"]
                        # Each Secret's keys are named, so the test (and the reader) know what it holds.
                        assert r.get("items"), f"{c['name']}: Secret {r.get('secretName', r.get('name'))} mounted without items"
                        name = r.get("secretName", r.get("name"))
                        used_secrets.setdefault(name, set()).update(i["key"] for i in r["items"])
    expected = REQUIRED_SECRETS | (HA_SECRETS if overlay in HA_OVERLAYS else {})
    assert used_secrets == expected
    docs = (ROOT / "docs/deploy.md").read_text()
    for name, keys in expected.items():
        assert f"create secret generic {name}" in docs, f"docs/deploy.md must say how to create {name}"
        for key in keys:
            assert f"--from-literal={key}=" in docs or f"--from-file={key}=" in docs, f"{name}: key {key}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_queue_arguments_agree_everywhere(overlay):
    """x-delivery-limit and x-max-length must be the same for every declarer (docs/protocol.md)."""
    objs = render(overlay)
    for setting, prefix in (("EMBER_DELIVERY_LIMIT", "DELIVERY_LIMIT"), ("EMBER_QUEUE_MAX_LENGTH", "QUEUE_MAX_LENGTH")):
        for name, part in (("ember-worker-ssdlite-person", "WORKER"), ("ember-dispatcher", "DISPATCHER"), ("ember-autoscaler", "AUTOSCALER")):
            (dep,) = find(objs, "Deployment", name)
            e = env_of(dep["spec"]["template"]["spec"]["containers"][0])[f"EMBER_{part}_{prefix}"]
            assert e["valueFrom"]["configMapKeyRef"] == {"name": "ember-config", "key": setting}


def test_prometheusrule_carries_the_rules_file():
    rules = yaml.safe_load((ROOT / "monitoring/rules/ember.rules.yaml").read_text())
    (pr,) = find(render("overlays/gpu-monitoring"), "PrometheusRule")
    assert pr["spec"] == rules
    proc = run([str(ROOT / ".venv/bin/python"), str(ROOT / "tests/deploy/gen_prometheusrule.py")])
    assert proc.returncode == 0, proc.stderr


def test_dashboard_configmap_is_generated_from_the_json_files():
    (cm,) = find(render("overlays/gpu-monitoring"), "ConfigMap", "ember-grafana-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = {p.name: p.read_text() for p in (ROOT / "monitoring/dashboards").glob("*.json")}
    assert files and cm["data"] == files


def test_rabbitmq_plugins_agree_between_cluster_and_compose():
    (cm,) = find(render("base"), "ConfigMap", "ember-rabbitmq-config")
    compose = (ROOT / "docker/rabbitmq/enabled_plugins").read_text()
    assert cm["data"]["enabled_plugins"] == compose
    assert "rabbitmq_prometheus" in compose and "rabbitmq_management" in compose
    assert "prometheus.tcp.port = 15692" in cm["data"]["rabbitmq.conf"]


# --- secure defaults (issue 18) -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_keeps_the_secure_defaults(overlay):
    """Tokens required, no secret in env or on a command line, Secrets mounted as updatable
    directories, Redis with a password, no dispatcher without auth behind a LoadBalancer."""
    assert k8s_violations(render(overlay)) == []


def _container(objs, name):
    (dep,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == name]
    return dep, dep["spec"]["template"]["spec"]["containers"][0]


def _drop_env(c, name):
    before = len(c["env"])
    c["env"] = [e for e in c["env"] if e["name"] != name]
    assert len(c["env"]) == before - 1, name


def _set_env(c, name, value=None, **source):
    c["env"] = [e for e in c["env"] if e["name"] != name] + [{"name": name, **({"value": value} if value is not None else source)}]


def _insecure(objs):
    _, c = _container(objs, "ember-dispatcher")
    _drop_env(c, "EMBER_DISPATCHER_TENANTS_FILE")
    c["args"] = ["--insecure-no-auth"]


def _service(objs, kind):
    (svc,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "ember-dispatcher"]
    svc["spec"]["type"] = kind


def _subpath(objs):
    dep, c = _container(objs, "ember-dispatcher")
    c["volumeMounts"] = [{"name": "ember-secrets", "mountPath": "/var/run/secrets/ember/tenants.toml", "subPath": "tenants.toml", "readOnly": True}]


def _tenants_from_configmap(objs):
    dep, _ = _container(objs, "ember-dispatcher")
    (vol,) = dep["spec"]["template"]["spec"]["volumes"]
    vol["projected"]["sources"][0] = {"configMap": {"name": "ember-config", "items": [{"key": "tenants.toml", "path": "tenants.toml"}]}}


# What each mutation of a rendered overlay breaks, and the words the check must say about it.
MUTATIONS = {
    "dispatcher without --tenants-file": (lambda o: _drop_env(_container(o, "ember-dispatcher")[1], "EMBER_DISPATCHER_TENANTS_FILE"), "dispatcher without tokens"),
    "insecure and tokens at once": (lambda o: _container(o, "ember-dispatcher")[1].update(args=["--insecure-no-auth"]), "refuses to start"),
    "env from a Secret": (lambda o: _set_env(_container(o, "ember-worker-ssdlite-person")[1], "X", valueFrom={"secretKeyRef": {"name": "ember-redis", "key": "password"}}), "is read from Secret ember-redis"),
    "AMQP URL with a password in env": (lambda o: _set_env(_container(o, "ember-autoscaler")[1], "EMBER_AMQP_URL", "amqp://ember-autoscaler:hunter2@ember-rabbitmq:5672/%2f"), "carries credentials in a URL"),
    "Redis URL with a password in env": (lambda o: _set_env(_container(o, "ember-dispatcher")[1], "EMBER_DISPATCHER_REDIS_URL", "redis://:hunter2@ember-redis:6379/0"), "carries credentials in a URL"),
    "callback secret in env": (lambda o: _set_env(_container(o, "ember-dispatcher")[1], "EMBER_DISPATCHER_CALLBACK_SECRET", "whsec_aGVsbG8="), "env EMBER_DISPATCHER_CALLBACK_SECRET carries a secret"),
    "tokens in env": (lambda o: _set_env(_container(o, "ember-dispatcher")[1], "EMBER_DISPATCHER_AUTH_TOKENS", "t0ken"), "env EMBER_DISPATCHER_AUTH_TOKENS carries a secret"),
    "a token on the command line": (lambda o: _container(o, "ember-dispatcher")[1].update(args=["--auth-token", "t0ken"]), "--auth-token puts a secret on the command line"),
    "worker AMQP URL not from a file": (lambda o: _drop_env(_container(o, "ember-worker-ssdlite-person")[1], "EMBER_AMQP_URL_FILE"), "AMQP credentials are not from a mounted Secret"),
    "tenants Secret mounted with subPath": (_subpath, "mounted with subPath"),
    "tenants file from a ConfigMap": (_tenants_from_configmap, "the tenants file /var/run/secrets/ember/tenants.toml is not a file of a mounted Secret"),
    "no auth behind a LoadBalancer": (lambda o: (_insecure(o), _service(o, "LoadBalancer")), "of type LoadBalancer exposes a dispatcher without auth"),
    "no auth behind a NodePort": (lambda o: (_insecure(o), _service(o, "NodePort")), "of type NodePort exposes a dispatcher without auth"),
    "Redis without requirepass": (lambda o: _container(o, "ember-redis")[1].update(command=["redis-server"], args=[]), "Redis without a password"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_secure_defaults_check_fails_a_broken_manifest(mutation):
    """Negative controls: each rule reports the breach it exists for."""
    objs = copy.deepcopy(render("overlays/gpu-monitoring"))
    mutate, expected = MUTATIONS[mutation]
    mutate(objs)
    problems = k8s_violations(objs)
    assert any(expected in p for p in problems), problems


def test_the_secure_defaults_check_allows_what_is_safe():
    """Insecure mode inside the cluster only, and a LoadBalancer in front of a dispatcher with
    tokens, are not breaches."""
    objs = copy.deepcopy(render("overlays/cpu"))
    _insecure(objs)
    assert k8s_violations(objs) == []
    objs = copy.deepcopy(render("overlays/cpu"))
    _service(objs, "LoadBalancer")
    assert k8s_violations(objs) == []


def _pods(objs):
    pods = {}
    for o in workloads(objs):
        if ns(o) == "ember":
            spec = pod_spec(o)
            ports = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", []) if "name" in p}
            pods[o["metadata"]["name"]] = Endpoint(o["metadata"]["name"], "ember", o["spec"]["template"]["metadata"]["labels"], "10.1.0.%d" % (len(pods) + 10), ports)
    return pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_only_what_each_part_needs(overlay):
    objs = render(overlay)
    net = Network(objs)
    pods = _pods(objs)
    dispatcher, worker, autoscaler = pods["ember-dispatcher"], pods["ember-worker-ssdlite-person"], pods["ember-autoscaler"]
    rabbitmq, redis = pods["ember-rabbitmq"], pods["ember-redis"]
    ingress = Endpoint("ingress-nginx controller", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, "10.1.1.2")
    prometheus = Endpoint("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, "10.1.1.3")
    keda = Endpoint("KEDA operator", "keda", {"app": "keda-operator"}, "10.1.1.8")
    client = Endpoint("labelled client", "ember", CLIENT_LABEL, "10.1.1.4")
    stranger = Endpoint("pod of another namespace", "default", {"app": "x"}, "10.1.1.5")
    unlabelled = Endpoint("unlabelled pod here", "ember", {"app": "x"}, "10.1.1.6")
    dns = Endpoint("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, "10.96.0.10")
    internet = Endpoint("callback receiver", ip="203.0.113.7")
    internet6 = Endpoint("callback receiver (IPv6)", ip="2001:db8::7")
    metadata = Endpoint("cloud metadata", ip="169.254.169.254")
    private = Endpoint("private address", ip="192.168.1.20")
    apiserver = Endpoint("API server", ip="172.20.0.1")
    every_pod = list(pods.values())
    cases = [
        # The API: from the ingress controller and labelled clients only.
        (ingress, dispatcher, 8080, True), (client, dispatcher, 8080, True),
        (stranger, dispatcher, 8080, False), (unlabelled, dispatcher, 8080, False), (worker, dispatcher, 8080, False),
        # The same API over gRPC: the same callers.
        (ingress, dispatcher, 8081, True), (client, dispatcher, 8081, True),
        (stranger, dispatcher, 8081, False), (worker, dispatcher, 8081, False),
        # Metrics: from the monitoring namespace only.
        (prometheus, dispatcher, 9200, True), (ingress, dispatcher, 9200, False), (client, dispatcher, 9200, False),
        (prometheus, worker, 9100, True), (stranger, worker, 9100, False),
        (prometheus, autoscaler, 9300, True), (client, autoscaler, 9300, False),
        (prometheus, rabbitmq, 15692, True), (stranger, rabbitmq, 15692, False),
        # The broker: AMQP from the three parts; the management UI from nobody (port-forward).
        (dispatcher, rabbitmq, 5672, True), (worker, rabbitmq, 5672, True), (autoscaler, rabbitmq, 5672, True),
        (client, rabbitmq, 5672, False), (redis, rabbitmq, 5672, False), (stranger, rabbitmq, 5672, False),
        (client, rabbitmq, 15672, False), (prometheus, rabbitmq, 15672, False),
        # The result store: the dispatcher only.
        (dispatcher, redis, 6379, True), (worker, redis, 6379, False), (autoscaler, redis, 6379, False), (client, redis, 6379, False),
        # Out: the worker reaches the broker and nothing else; with a model store, HTTPS to public
        # addresses too (S3, STS), never private ranges or the cloud metadata endpoint.
        (worker, internet, 443, overlay in MODEL_STORE_OVERLAYS), (worker, internet6, 443, overlay in MODEL_STORE_OVERLAYS),
        (worker, internet, 80, False), (worker, metadata, 80, False), (worker, metadata, 443, False),
        (worker, private, 443, False), (worker, apiserver, 443, False), (worker, dispatcher, 8080, False),
        # The autoscaler: the broker and the API server's ports; signal-only (KEDA), the broker
        # only, and KEDA's operator in to the external scaler.
        (autoscaler, apiserver, 443, overlay not in KEDA_OVERLAYS), (autoscaler, apiserver, 6443, overlay not in KEDA_OVERLAYS),
        (autoscaler, internet, 80, False),
        (keda, autoscaler, 9400, overlay in KEDA_OVERLAYS), (prometheus, autoscaler, 9400, False), (client, autoscaler, 9400, False),
        (stranger, autoscaler, 9400, False),
        # The dispatcher: callbacks to public addresses on any port, not into private ranges.
        (dispatcher, internet, 443, True), (dispatcher, internet, 8443, True), (dispatcher, internet6, 443, True),
        (dispatcher, metadata, 80, False), (dispatcher, private, 443, False), (dispatcher, worker, 9100, False),
        # The broker and Redis connect nowhere.
        (rabbitmq, internet, 443, False), (redis, internet, 443, False), (rabbitmq, redis, 6379, False),
    ]
    wrong = [f"{s} -> {d}:{port} {'denied' if want else 'allowed'}" for s, d, port, want in cases if net.allows(s, d, port) != want]
    for pod in every_pod:
        if not net.allows(pod, dns, 53, "UDP") or not net.allows(pod, dns, 53, "TCP"):
            wrong.append(f"{pod} cannot resolve names")
        if net.allows(pod, dns, 80):
            wrong.append(f"{pod} reaches kube-dns beyond port 53")
    assert wrong == []
    # Every pod here is isolated both ways: nothing that is not listed above gets through.
    for pod in every_pod:
        assert net._selecting(pod, "Ingress") and net._selecting(pod, "Egress"), pod


def test_the_network_check_fails_a_policy_left_open():
    """Negative control: the evaluator notices an allow-all rule."""
    objs = copy.deepcopy(render("base"))
    (np,) = [o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "ember-redis"]
    np["spec"]["ingress"].append({})
    redis = _pods(objs)["ember-redis"]
    stranger = Endpoint("pod of another namespace", "default", {"app": "x"}, "10.1.1.5")
    assert Network(objs).allows(stranger, redis, 6379)
    assert not Network(render("base")).allows(stranger, redis, 6379)


# --- the replicated broker (manifests/components/ha-broker) -----------------------------------


def _rabbitmq(objs):
    (sts,) = find(objs, "StatefulSet", "ember-rabbitmq")
    spec = sts["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == "rabbitmq"]
    return sts, spec, c


def _conf_lines(text):
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _conf(text):
    return dict(line.split(" = ", 1) for line in _conf_lines(text))


@pytest.mark.parametrize("overlay", HA_OVERLAYS)
def test_ha_broker_is_three_nodes_that_find_each_other(overlay):
    objs = render(overlay)
    sts, spec, c = _rabbitmq(objs)
    replicas = sts["spec"]["replicas"]
    assert replicas == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    # One broker per Kubernetes node.
    (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    # Stable long node names in the headless Service's DNS, which publishes pods before they are ready.
    env = env_of(c)
    headless = sts["spec"]["serviceName"]
    assert env["RABBITMQ_NODENAME"]["value"] == f"rabbit@$(POD_NAME).{headless}.$(POD_NAMESPACE)"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    (svc,) = find(objs, "Service", headless)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in svc["spec"]["ports"]} >= {4369, 25672}
    # RabbitMQ 4.1 or later: its Kubernetes peer discovery joins pod 0 without the Kubernetes API
    # (no ServiceAccount token, Role or egress to the API server is given to the broker).
    for container in containers(spec):
        major, minor = (int(x) for x in re.match(r"rabbitmq:(\d+)\.(\d+)", container["image"]).groups())
        assert (major, minor) >= (4, 1), container["image"]
    assert not any(o["kind"] == "Role" and "rabbitmq" in o["metadata"]["name"] for o in objs)
    (cm,) = find(objs, "ConfigMap", "ember-rabbitmq-config")
    assert "rabbitmq_peer_discovery_k8s" in cm["data"]["enabled_plugins"]
    conf = _conf(cm["data"]["rabbitmq.conf"])
    assert conf["cluster_formation.peer_discovery_backend"] == "k8s"
    assert conf["cluster_partition_handling"] == "pause_minority"


@pytest.mark.parametrize("overlay", HA_OVERLAYS)
def test_ha_broker_keeps_the_single_nodes_settings_users_and_secrets(overlay):
    """The cluster's rabbitmq.conf holds every line of the base's (a change to the base must be
    made in the component too); the users still come from the definitions, rendered by the same
    init container from the same Secrets; the Erlang cookie comes from its Secret as a file."""
    base_conf = find(render("base"), "ConfigMap", "ember-rabbitmq-config")[0]["data"]
    objs = render(overlay)
    (cm,) = find(objs, "ConfigMap", "ember-rabbitmq-config")
    assert set(_conf_lines(base_conf["rabbitmq.conf"])) <= set(_conf_lines(cm["data"]["rabbitmq.conf"]))
    base_plugins = set(re.findall(r"\w+", base_conf["enabled_plugins"]))
    assert base_plugins <= set(re.findall(r"\w+", cm["data"]["enabled_plugins"]))
    _, base_spec, _ = _rabbitmq(render("base"))
    _, spec, c = _rabbitmq(objs)
    inits = {i["name"]: i for i in spec["initContainers"]}
    assert inits["definitions"] == {i["name"]: i for i in base_spec["initContainers"]}["definitions"]
    cookie = inits["erlang-cookie"]
    script = " ".join(cookie["command"])
    data = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["data"]
    assert f"{data}/.erlang.cookie" in script and "chmod 400" in script
    src = re.search(r"cp (\S+) ", script).group(1)
    assert _file_source(spec, cookie, src) == "Secret ember-rabbitmq-erlang-cookie"
    assert {m["name"]: m["mountPath"] for m in cookie["volumeMounts"]}["data"] == data


@pytest.mark.parametrize("overlay", HA_OVERLAYS)
def test_ha_broker_replicates_quorum_queues_three_times_and_keeps_their_majority(overlay):
    objs = render(overlay)
    sts, spec, c = _rabbitmq(objs)
    replicas = sts["spec"]["replicas"]
    conf = _conf(find(objs, "ConfigMap", "ember-rabbitmq-config")[0]["data"]["rabbitmq.conf"])
    assert int(conf["quorum_queue.initial_cluster_size"]) == replicas
    # A queue declared before every node joined is grown to three by the broker.
    assert conf["quorum_queue.continuous_membership_reconciliation.enabled"] == "true"
    assert int(conf["quorum_queue.continuous_membership_reconciliation.target_group_size"]) == replicas
    majority = replicas // 2 + 1
    # Voluntary disruptions: never more nodes at once than the queues' majority allows.
    (pdb,) = find(objs, "PodDisruptionBudget", "ember-rabbitmq")
    assert replicas - pdb["spec"]["maxUnavailable"] >= majority
    assert pdb["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    # A node stops only once every quorum queue keeps its majority without it, within the grace.
    stop = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    wait = int(re.search(r"await_online_quorum_plus_one -t (\d+)", stop).group(1))
    drain = int(re.search(r"drain -t (\d+)", stop).group(1))
    assert spec["terminationGracePeriodSeconds"] > wait + drain


@pytest.mark.parametrize("overlay", HA_OVERLAYS)
def test_ha_broker_nodes_reach_each_other_and_nothing_else(overlay):
    objs = render(overlay)
    net = Network(objs)
    pods = _pods(objs)
    rabbit = pods["ember-rabbitmq"]
    peer = Endpoint("another broker node", "ember", rabbit.labels, "10.1.0.99", rabbit.ports)
    worker, dispatcher, redis = pods["ember-worker-ssdlite-person"], pods["ember-dispatcher"], pods["ember-redis"]
    stranger = Endpoint("pod of another namespace", "default", {"app": "x"}, "10.1.1.5")
    apiserver = Endpoint("API server", ip="172.20.0.1")
    internet = Endpoint("somewhere", ip="203.0.113.7")
    cases = [
        (rabbit, peer, 4369, True), (rabbit, peer, 25672, True), (peer, rabbit, 25672, True),
        (rabbit, peer, 5672, False), (rabbit, peer, 15672, False),
        (worker, rabbit, 25672, False), (dispatcher, rabbit, 4369, False), (stranger, rabbit, 25672, False),
        (rabbit, redis, 6379, False), (rabbit, apiserver, 443, False), (rabbit, internet, 443, False),
        # The parts still reach every node's AMQP port (the Service picks one).
        (worker, peer, 5672, True), (dispatcher, peer, 5672, True),
    ]
    wrong = [f"{s} -> {d}:{port} {'denied' if want else 'allowed'}" for s, d, port, want in cases if net.allows(s, d, port) != want]
    assert wrong == []
    # Negative control: without the component's policy the nodes could not reach each other.
    alone = Network([o for o in objs if o["metadata"]["name"] != "ember-rabbitmq-cluster" or o["kind"] != "NetworkPolicy"])
    assert not alone.allows(rabbit, peer, 25672) and not alone.allows(rabbit, peer, 4369)
    # Clients are given one Service over every node.
    (svc,) = find(objs, "Service", "ember-rabbitmq")
    assert "clusterIP" not in svc["spec"] or svc["spec"]["clusterIP"] != "None"
    assert svc["spec"]["selector"].items() <= _rabbitmq(objs)[0]["spec"]["template"]["metadata"]["labels"].items()
