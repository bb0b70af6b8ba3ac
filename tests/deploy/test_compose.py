"""docker/compose.yaml: parsed strictly by the Rust compose_spec crate (PyPI compose-spec: unknown
fields and wrongly typed values fail), then what a parser cannot see: build contexts, Dockerfiles and mounted files exist, host ports do not
clash, dependencies exist, Grafana's provisioning points at the mounted dashboards.

`docker compose config` would be the reference check, but the compose plugin is not installed
here (the docker CLI has no `compose` subcommand and no engine)."""

import pytest
import yaml

from conftest import ROOT

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
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown {dep}"
    assert len(host_ports) == len(set(host_ports)), f"host ports clash: {host_ports}"
    assert len({p for _, p in host_ports}) == len(host_ports)


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
