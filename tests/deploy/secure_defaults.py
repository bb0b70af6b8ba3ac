"""The secure-defaults policy every deployment path must hold (issue 18), as functions that list
what is wrong: `k8s_violations` for rendered Kubernetes objects, `compose_violations` for
docker/compose.yaml. The tests run them on every overlay and on compose, and on mutated copies
to show that each rule fires. `Network` evaluates NetworkPolicies (who may reach whom)."""

import ipaddress
import re

# An environment variable whose name says it holds a credential; `..._FILE` names a path.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|(?:^|_)PASS(?:$|_)|SECRET|TOKEN|CREDENTIAL|API_?KEY|PRIVATE_?KEY", re.I)
# A URL carrying a password: scheme://user:password@ (the user may be empty: redis://:pw@).
CREDENTIALS_IN_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s@:]*:[^/\s@]+@", re.I)
# Flags whose value is itself a secret (no file form, or a file form exists and must be used).
SECRET_FLAGS = ("--auth-token", "--callback-secret", "--amqp-password")
TRUE = {"true", "1", "yes", "on"}


def ember_part(image: str) -> str | None:
    """dispatcher, worker or autoscaler for an Ember image (any registry, tag, -cuda)."""
    m = re.search(r"(?:^|/)ember-(dispatcher|worker|autoscaler)(?:-cuda)?(?::|@|$)", image)
    return m.group(1) if m else None


def _is_redis(image: str) -> bool:
    return re.search(r"(?:^|/)redis(?::|@|$)", image) is not None


def _flag(argv: list[str], flag: str):
    """The value of `flag` in argv (`--f v` or `--f=v`); True for a bare boolean flag; None."""
    for i, a in enumerate(argv):
        if a == flag:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            return nxt if nxt is not None and not nxt.startswith("--") else True
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def setting(argv: list[str], env: dict, flag: str, var: str):
    """A part's setting from its flag or its environment variable (the flag wins), or None."""
    value = _flag(argv, flag)
    if value is not None:
        return value
    return env.get(var)


def is_set(value) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in TRUE)


def env_problems(where: str, name: str, value) -> list[str]:
    problems = []
    if isinstance(value, str) and CREDENTIALS_IN_URL.search(value):
        problems.append(f"{where}: env {name} carries credentials in a URL (mount it as a file: ..._URL_FILE)")
    if SECRET_NAME.search(name) and not name.upper().endswith("FILE"):
        problems.append(f"{where}: env {name} carries a secret (give its file instead: {name}_FILE or the --...-file flag)")
    return problems


def argv_problems(where: str, argv: list[str]) -> list[str]:
    problems = []
    for a in argv:
        if CREDENTIALS_IN_URL.search(a):
            problems.append(f"{where}: credentials in a URL on the command line")
    for flag in SECRET_FLAGS:
        value = _flag(argv, flag)
        if isinstance(value, str):
            problems.append(f"{where}: {flag} puts a secret on the command line (use a file from a Secret)")
    return problems


# --- Kubernetes -------------------------------------------------------------------------------

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


def _pod(obj):
    if obj["kind"] in WORKLOAD_KINDS:
        return obj["spec"]["template"]["metadata"].get("labels", {}), obj["spec"]["template"]["spec"]
    if obj["kind"] == "Pod":
        return obj["metadata"].get("labels", {}), obj["spec"]
    return None


def _secret_sources(volume: dict) -> list[tuple[str | None, list]]:
    """(secret name, items) of each Secret a volume draws from."""
    if "secret" in volume:
        return [(volume["secret"].get("secretName"), volume["secret"].get("items"))]
    if "projected" in volume:
        return [(s["secret"].get("name"), s["secret"].get("items")) for s in volume["projected"]["sources"] if "secret" in s]
    return []


def _file_source(spec: dict, container: dict, path: str) -> str | None:
    """`Secret <name>` when `path` is a file of a Secret mounted (as a directory) in `container`;
    otherwise what it is, or None when no volume holds it."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    for m in mounts:
        root = m["mountPath"].rstrip("/") + "/"
        if m.get("subPath") and path == m["mountPath"]:
            vol = volumes.get(m["name"], {})
            return f"Secret {_secret_sources(vol)[0][0]} (subPath)" if _secret_sources(vol) else "a subPath mount"
        if path.startswith(root) and not m.get("subPath"):
            rel = path[len(root):]
            vol = volumes.get(m["name"], {})
            for name, items in _secret_sources(vol):
                if items is None or any(i["path"] == rel for i in items):
                    return f"Secret {name}"
            return f"volume {m['name']} (not a Secret)"
    return None


def k8s_violations(objs: list[dict]) -> list[str]:
    problems = []
    services = [o for o in objs if o["kind"] == "Service"]
    ingresses = [o for o in objs if o["kind"] == "Ingress"]
    for obj in objs:
        pod = _pod(obj)
        if pod is None:
            continue
        labels, spec = pod
        namespace = obj["metadata"].get("namespace")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{obj['kind']}/{obj['metadata']['name']} container {c['name']}"
            argv = [str(a) for a in c.get("command", []) + c.get("args", [])]
            env = {}
            for e in c.get("env", []):
                if "secretKeyRef" in e.get("valueFrom", {}):
                    ref = e["valueFrom"]["secretKeyRef"]
                    problems.append(f"{where}: env {e['name']} is read from Secret {ref.get('name')} (mount the Secret as a file)")
                problems += env_problems(where, e["name"], e.get("value"))
                env[e["name"]] = e.get("value")
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    problems.append(f"{where}: envFrom Secret {src['secretRef'].get('name')} puts secrets in env")
            problems += argv_problems(where, argv)
            if _is_redis(c.get("image", "")) and not any("requirepass" in a for a in argv):
                problems.append(f"{where}: Redis without a password (requirepass)")
            for m in c.get("volumeMounts", []):
                secrets = [n for n, _ in _secret_sources(volumes.get(m["name"], {}))]
                if secrets and (m.get("subPath") or m.get("subPathExpr")):
                    problems.append(
                        f"{where}: Secret {', '.join(secrets)} mounted with subPath at {m['mountPath']} "
                        "(a subPath copy never sees the Secret change: no rotation without restart)"
                    )
            part = ember_part(c.get("image", ""))
            if part is None:
                continue

            def from_secret(what, flag, var):
                path = setting(argv, env, flag, var)
                if path is None:
                    return None
                source = _file_source(spec, c, str(path))
                if not (source or "").startswith("Secret ") or "(subPath)" in (source or ""):
                    problems.append(f"{where}: {what} {path} is not a file of a mounted Secret ({source or 'no volume holds it'})")
                return path

            found, auth, insecure = _part_problems(where, part, argv, env, from_secret, "mounted Secret", plain_callback_secret_ok=True)
            problems += found
            if part != "dispatcher":
                continue
            if auth:
                continue
            exposing = [
                s for s in services
                if s["metadata"].get("namespace") == namespace
                and s["spec"].get("selector")
                and s["spec"]["selector"].items() <= labels.items()
            ]
            for s in exposing:
                kind = s["spec"].get("type", "ClusterIP")
                if kind in ("LoadBalancer", "NodePort"):
                    problems.append(f"Service/{s['metadata']['name']} of type {kind} exposes a dispatcher without auth ({where})")
            names = {s["metadata"]["name"] for s in exposing}
            for ing in ingresses:
                if ing["metadata"].get("namespace") == namespace and names & _ingress_services(ing):
                    problems.append(f"Ingress/{ing['metadata']['name']} exposes a dispatcher without auth ({where})")
    return problems


def _ingress_services(ing: dict) -> set[str]:
    found = set()
    backends = [ing["spec"].get("defaultBackend", {})]
    for rule in ing["spec"].get("rules", []):
        backends += [p.get("backend", {}) for p in rule.get("http", {}).get("paths", [])]
    for b in backends:
        if "service" in b:
            found.add(b["service"]["name"])
    return found


# --- NetworkPolicies --------------------------------------------------------------------------


class Endpoint:
    """A pod (namespace, labels, ip) or an address outside the cluster (ip only)."""

    def __init__(self, name, namespace=None, labels=None, ip=None, ports=None):
        self.name, self.namespace, self.labels = name, namespace, labels or {}
        self.ip = ipaddress.ip_address(ip) if ip else None
        self.ports = ports or {}  # container port name -> number

    def __repr__(self):
        return self.name


def _matches(selector: dict, labels: dict) -> bool:
    if selector.get("matchExpressions"):
        raise NotImplementedError("matchExpressions")
    return selector.get("matchLabels", {}).items() <= labels.items()


class Network:
    """Allows traffic as Kubernetes NetworkPolicies do: a pod selected by a policy of a
    direction admits only what one of those policies' rules allows; others admit everything."""

    def __init__(self, objs):
        self.policies = [o for o in objs if o["kind"] == "NetworkPolicy"]

    def _selecting(self, pod: Endpoint, direction: str):
        return [
            p for p in self.policies
            if pod.namespace is not None
            and p["metadata"].get("namespace") == pod.namespace
            and _matches(p["spec"]["podSelector"], pod.labels)
            and direction in p["spec"].get("policyTypes", ["Ingress"])
        ]

    @staticmethod
    def _peer(policy, peer: dict, other: Endpoint) -> bool:
        if "ipBlock" in peer:
            if other.ip is None:
                return False
            block = peer["ipBlock"]
            net = ipaddress.ip_network(block["cidr"])
            if other.ip.version != net.version or other.ip not in net:
                return False
            return not any(other.ip in ipaddress.ip_network(e) for e in block.get("except", []) if ipaddress.ip_network(e).version == other.ip.version)
        if other.namespace is None:
            return False
        if "namespaceSelector" in peer:
            ns_labels = {"kubernetes.io/metadata.name": other.namespace}
            if not _matches(peer["namespaceSelector"], ns_labels):
                return False
        elif other.namespace != policy["metadata"].get("namespace"):
            return False
        return _matches(peer.get("podSelector", {}), other.labels)

    @staticmethod
    def _port(rule: dict, port: int, protocol: str, target: Endpoint) -> bool:
        if "ports" not in rule:
            return True
        for p in rule["ports"]:
            if p.get("protocol", "TCP") != protocol:
                continue
            want = p.get("port")
            if want is None or want == port or (isinstance(want, str) and target.ports.get(want) == port):
                return True
        return False

    def allows(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
        egress = self._selecting(src, "Egress")
        if egress and not any(
            self._port(rule, port, protocol, dst) and (not rule.get("to") or any(self._peer(p, peer, dst) for peer in rule["to"]))
            for p in egress for rule in p["spec"].get("egress", [])
        ):
            return False
        ingress = self._selecting(dst, "Ingress")
        if ingress and not any(
            self._port(rule, port, protocol, dst) and (not rule.get("from") or any(self._peer(p, peer, src) for peer in rule["from"]))
            for p in ingress for rule in p["spec"].get("ingress", [])
        ):
            return False
        return True


# --- docker compose ---------------------------------------------------------------------------


def _environment(svc: dict) -> dict:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def _argv(value) -> list[str]:
    if value is None:
        return []
    return [str(a) for a in value] if isinstance(value, list) else str(value).split()


def _service_part(svc: dict) -> str | None:
    part = ember_part(svc.get("image", ""))
    if part is None and "build" in svc:
        m = re.search(r"(dispatcher|worker|autoscaler)(?:-cuda)?\.Dockerfile$", svc["build"].get("dockerfile", ""))
        part = m.group(1) if m else None
    return part



def _part_problems(where, part, argv, env, from_secret, secret_word, plain_callback_secret_ok):
    """The credential checks of an Ember part (its AMQP URL from a secret file) and, for the
    dispatcher, its auth ones. `from_secret(what, flag, var)` checks that a flag's file is a
    mounted secret (and records it if not). Returns (problems, auth, insecure); auth and
    insecure are None for a part that is not the dispatcher."""
    problems = []
    amqp = from_secret("the AMQP URL file", "--amqp-url-file", "EMBER_AMQP_URL_FILE")
    amqp_password = from_secret("the AMQP password file", "--amqp-password-file", "EMBER_AMQP_PASSWORD_FILE")
    if amqp is None and amqp_password is None:
        problems.append(f"{where}: the AMQP credentials are not from a {secret_word} (EMBER_AMQP_URL_FILE)")
    if part != "dispatcher":
        return problems, None, None
    tenants = from_secret("the tenants file", "--tenants-file", "EMBER_DISPATCHER_TENANTS_FILE")
    tokens = setting(argv, env, "--auth-token", "EMBER_DISPATCHER_AUTH_TOKENS")
    insecure = is_set(setting(argv, env, "--insecure-no-auth", "EMBER_DISPATCHER_INSECURE_NO_AUTH"))
    callback = from_secret("the callback secret file", "--callback-secret-file", "EMBER_DISPATCHER_CALLBACK_SECRET_FILE")
    redis = from_secret("the Redis URL file", "--redis-url-file", "EMBER_DISPATCHER_REDIS_URL_FILE")
    auth = tenants is not None or tokens is not None
    if not auth and not insecure:
        problems.append(f"{where}: dispatcher without tokens: neither --tenants-file nor --auth-token (it refuses to start without --insecure-no-auth)")
    if auth and insecure:
        problems.append(f"{where}: dispatcher with --insecure-no-auth and tokens (it refuses to start)")
    plain_callback = plain_callback_secret_ok and setting(argv, env, "--callback-secret", "EMBER_DISPATCHER_CALLBACK_SECRET") is not None
    if not insecure and callback is None and not plain_callback:
        problems.append(f"{where}: dispatcher without --callback-secret-file (it refuses to start)")
    if redis is None:
        problems.append(f"{where}: dispatcher without --redis-url-file: Redis without a password")
    return problems, auth, insecure

def compose_violations(compose: dict) -> list[str]:
    problems = []
    top_secrets = compose.get("secrets", {})
    for name, svc in compose["services"].items():
        where = f"service {name}"
        env = _environment(svc)
        argv = _argv(svc.get("entrypoint")) + _argv(svc.get("command"))
        for var, value in env.items():
            problems += env_problems(where, var, value)
        problems += argv_problems(where, argv)
        if _is_redis(svc.get("image", "")) and not any("requirepass" in a for a in argv):
            problems.append(f"{where}: Redis without a password (requirepass)")
        mounted = {s if isinstance(s, str) else s.get("target", s["source"]) for s in svc.get("secrets", [])}
        for s in svc.get("secrets", []):
            source = s if isinstance(s, str) else s["source"]
            if source not in top_secrets:
                problems.append(f"{where}: secret {source} is not defined")

        def from_secret(what, flag, var):
            path = setting(argv, env, flag, var)
            if path is None:
                return None
            m = re.fullmatch(r"/run/secrets/([^/]+)", str(path))
            if not m or m.group(1) not in mounted:
                problems.append(f"{where}: {what} {path} is not one of its secrets (/run/secrets/<name>)")
            return path

        part = _service_part(svc)
        if part is None:
            continue
        found, auth, insecure = _part_problems(where, part, argv, env, from_secret, "secret", plain_callback_secret_ok=False)
        problems += found
        if part != "dispatcher":
            continue
        if insecure and not auth:
            for port in svc.get("ports", []):
                parts = str(port).split(":")
                if len(parts) < 3 or parts[0] not in ("127.0.0.1", "localhost", "[::1]"):
                    problems.append(f"{where}: publishes {port} beyond this machine for a dispatcher without auth")
    return problems
