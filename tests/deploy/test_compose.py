"""docker/compose.yaml: parsed strictly by the Rust compose_spec crate (PyPI compose-spec: unknown
fields and wrongly typed values fail), then what a parser cannot see: build contexts, Dockerfiles and mounted files exist, host ports do not
clash, dependencies exist, Grafana's provisioning points at the mounted dashboards.

`docker compose config` would be the reference check, but the compose plugin is not installed
here (the docker CLI has no `compose` subcommand and no engine)."""

import copy
import hashlib
import json

import pytest
import yaml

from conftest import ROOT, run
from secure_defaults import compose_violations

DOCKER = ROOT / "docker"


def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_parses_as_the_compose_specification():
    import compose_spec

    text = (DOCKER / "compose.yaml").read_text()
    parsed = compose_spec.PyCompose.from_yaml(text)
    parsed.validate()
    assert sorted(parsed.service_names()) == sorted(compose()["services"])
    # Negative control: the parser rejects what `docker compose config` would.
    bad = text.replace("stop_grace_period: 35s", "stop_grace_period: {seconds: 35}")
    with pytest.raises(Exception, match="stop_grace_period"):
        compose_spec.PyCompose.from_yaml(bad)


def test_compose_references_exist_and_ports_do_not_clash():
    c = compose()
    services = c["services"]
    assert {"rabbitmq", "redis", "worker", "dispatcher", "prometheus", "grafana"} <= set(services)
    host_ports = []
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            ctx = (DOCKER / svc["build"]["context"]).resolve()
            assert ctx.is_dir(), f"{name}: build context {ctx}"
            assert (ctx / svc["build"]["dockerfile"]).is_file(), f"{name}: dockerfile"
        for vol in svc.get("volumes", []):
            if isinstance(vol, str) and vol.startswith("."):
                src = (DOCKER / vol.split(":")[0]).resolve()
                assert src.exists(), f"{name}: mounted {src} does not exist"
            elif isinstance(vol, str):
                assert vol.split(":")[0] in c.get("volumes", {}), f"{name}: volume {vol}"
        for port in svc.get("ports", []):
            parts = str(port).split(":")
            host = (parts[0] if len(parts) == 3 else "0.0.0.0", parts[-2])
            host_ports.append(host)
        for s in svc.get("secrets", []):
            assert (s if isinstance(s, str) else s["source"]) in c.get("secrets", {}), f"{name}: secret {s}"
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown {dep}"
    assert len(host_ports) == len(set(host_ports)), f"host ports clash: {host_ports}"
    assert len({p for _, p in host_ports}) == len(host_ports)
    for name, secret in c.get("secrets", {}).items():
        src = (DOCKER / secret["file"]).resolve()
        assert src.is_file(), f"secret {name}: {src}"
        assert src.parent == DOCKER / "secrets" and src.name.startswith("dev-"), f"secret {name}: not a docker/secrets/dev-* file"


def test_grafana_provisioning_points_at_the_dashboards():
    c = compose()
    mounts = dict(v.split(":")[:2] for v in c["services"]["grafana"]["volumes"] if v.startswith("."))
    prov = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/ember.yaml").read_text())
    path = prov["providers"][0]["options"]["path"]
    src = [s for s, t in mounts.items() if t == path]
    assert src and (DOCKER / src[0]).resolve() == (ROOT / "monitoring/dashboards")
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    prom_mounts = dict(v.split(":")[:2] for v in c["services"]["prometheus"]["volumes"] if v.startswith("."))
    assert (DOCKER / [s for s, t in prom_mounts.items() if t == "/etc/prometheus/rules"][0]).resolve() == ROOT / "monitoring/rules"
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["rules/ember.rules.yaml"]
    jobs = {j["job_name"] for j in prom["scrape_configs"]}
    assert {"ember-worker", "ember-dispatcher", "rabbitmq"} <= jobs


def test_compose_worker_grace_exceeds_drain():
    svc = compose()["services"]["worker"]
    assert svc["stop_grace_period"] == "35s"  # the worker drains for 25s by default


def test_compose_runs_ember_images_as_their_non_root_user_with_a_read_only_root():
    import re

    built = {name: svc for name, svc in compose()["services"].items() if "build" in svc}
    assert {"worker", "dispatcher"} <= set(built)
    for name, svc in built.items():
        dockerfile = (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).read_text()
        final = dockerfile.rsplit("\nFROM ", 1)[1]
        image_user = re.findall(r"^USER (\S+)$", final, re.M)[-1]
        assert svc.get("user") == image_user, f"{name}: user {svc.get('user')!r}, image has {image_user}"
        assert int(image_user.split(":")[0]) > 0, f"{name}: runs as root"
        assert svc.get("read_only") is True, f"{name}: root filesystem is writable"


# --- secure defaults (issue 18) -----------------------------------------------------------------


def secret_text(c, name):
    return (DOCKER / c["secrets"][name]["file"]).read_text()


def test_compose_keeps_the_secure_defaults():
    """Tokens required, every credential a secret file (none in env or on a command line),
    Redis with a password, each part its own RabbitMQ user."""
    assert compose_violations(compose()) == []


def _env(svc):
    return svc.setdefault("environment", {})


COMPOSE_MUTATIONS = {
    "dispatcher without a tenants file": (lambda s: _env(s["dispatcher"]).pop("EMBER_DISPATCHER_TENANTS_FILE"), "dispatcher without tokens"),
    "insecure and tokens at once": (lambda s: _env(s["dispatcher"]).update(EMBER_DISPATCHER_INSECURE_NO_AUTH="true"), "refuses to start"),
    "insecure on every interface": (
        lambda s: (_env(s["dispatcher"]).pop("EMBER_DISPATCHER_TENANTS_FILE"), s["dispatcher"].update(command=["--insecure-no-auth"], ports=["8080:8080"])),
        "publishes 8080:8080 beyond this machine",
    ),
    "AMQP URL with a password in env": (lambda s: _env(s["worker"]).update(EMBER_AMQP_URL="amqp://ember-worker:pw@rabbitmq:5672/%2f"), "carries credentials in a URL"),
    "broker password in env": (lambda s: _env(s["rabbitmq"]).update(RABBITMQ_DEFAULT_PASS="ember"), "env RABBITMQ_DEFAULT_PASS carries a secret"),
    "Grafana password in env": (lambda s: _env(s["grafana"]).update(GF_SECURITY_ADMIN_PASSWORD="admin"), "env GF_SECURITY_ADMIN_PASSWORD carries a secret"),
    "tenants file that is not a secret": (lambda s: _env(s["dispatcher"]).update(EMBER_DISPATCHER_TENANTS_FILE="/etc/tenants.toml"), "is not one of its secrets"),
    "Redis without requirepass": (lambda s: s["redis"].update(entrypoint=None, command=["--save", ""]), "Redis without a password"),
}


@pytest.mark.parametrize("mutation", COMPOSE_MUTATIONS)
def test_the_compose_check_fails_a_broken_compose_file(mutation):
    c = copy.deepcopy(compose())
    mutate, expected = COMPOSE_MUTATIONS[mutation]
    mutate(c["services"])
    problems = compose_violations(c)
    assert any(expected in p for p in problems), problems


def test_compose_dev_secrets_agree_and_the_dev_token_is_documented():
    c = compose()
    token = "ember-dev-token"
    tenants = secret_text(c, "tenants.toml")
    assert hashlib.sha256(token.encode()).hexdigest() in tenants
    assert "DEVELOPMENT ONLY" in tenants
    assert token in (ROOT / "docs/deploy.md").read_text()
    for part in ("dispatcher", "worker"):
        password = secret_text(c, f"amqp-{part}-password").strip()
        assert secret_text(c, f"amqp-{part}-url").strip() == f"amqp://ember-{part}:{password}@rabbitmq:5672/%2f"
    redis = secret_text(c, "redis-password").strip()
    assert secret_text(c, "redis-url").strip() == f"redis://:{redis}@redis:6379/0"


def test_compose_broker_renders_the_clusters_definitions(tmp_path):
    """The broker runs the cluster's render script on the cluster's template with the dev
    passwords; the result is what rabbitmq.conf loads."""
    c = compose()
    svc = c["services"]["rabbitmq"]
    mounts = dict(v.split(":")[:2] for v in svc["volumes"] if v.startswith("."))
    template_dir = [s for s, t in mounts.items() if t == "/etc/ember/rabbitmq"]
    assert template_dir and (DOCKER / template_dir[0]).resolve() == ROOT / "manifests/base/rabbitmq"
    script = " ".join(svc["entrypoint"])
    assert "render-definitions.sh /etc/ember/rabbitmq/definitions.template.jsonc /run/secrets /tmp/ember-definitions.json" in script
    assert "exec docker-entrypoint.sh rabbitmq-server" in script
    conf = [s for s, t in mounts.items() if t.startswith("/etc/rabbitmq/conf.d/")]
    assert conf and "load_definitions = /tmp/ember-definitions.json" in (DOCKER / conf[0]).read_text()
    for user in ("admin", "dispatcher", "worker", "autoscaler"):
        assert f"amqp-{user}-password" in svc["secrets"]
        (tmp_path / f"amqp-{user}-password").write_text(secret_text(c, f"amqp-{user}-password"))
    out = tmp_path / "definitions.json"
    proc = run(["sh", str(ROOT / "manifests/base/rabbitmq/render-definitions.sh"),
                str(ROOT / "manifests/base/rabbitmq/definitions.template.jsonc"), str(tmp_path), str(out)])
    assert proc.returncode == 0, proc.stderr
    users = {u["name"]: u["password"] for u in json.loads(out.read_text())["users"]}
    assert users["ember-dispatcher"] == secret_text(c, "amqp-dispatcher-password").strip()

