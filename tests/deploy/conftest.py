"""Shared helpers for the deployment tests (scripts/test-deploy runs them)."""

import functools
import os
import pathlib
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv/bin"
NODE_MODULES = ROOT / ".tools/node/node_modules"
OVERLAYS = ["base", "overlays/cpu", "overlays/gpu", "overlays/cpu-monitoring", "overlays/gpu-monitoring", "overlays/ha-broker",
            "overlays/model-store", "overlays/keda"]
# Overlays with RabbitMQ as a three-node cluster (manifests/components/ha-broker).
HA_OVERLAYS = ["overlays/ha-broker"]
# Overlays whose workers fetch their model from S3 with a web identity (manifests/components/model-store).
MODEL_STORE_OVERLAYS = ["overlays/model-store"]
# Overlays where KEDA scales the workers on the signal-only autoscaler's answers (manifests/overlays/keda).
KEDA_OVERLAYS = ["overlays/keda"]
# Overlays where the autoscaler's kubernetes backend scales InferencePools.
POOL_OVERLAYS = [o for o in OVERLAYS if o not in KEDA_OVERLAYS]
# Kubernetes versions kubernetes-validate checks the rendered objects against.
K8S_VERSIONS = ["1.33.0", "1.37.0"]


def run(cmd, **kw):
    """Runs a command, returning the CompletedProcess; output captured as text."""
    return subprocess.run(cmd, capture_output=True, text=True, cwd=kw.pop("cwd", ROOT), **kw)


@functools.cache
def render_text(overlay: str) -> str:
    proc = run(["kubectl", "kustomize", str(ROOT / "manifests" / overlay)])
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
    return proc.stdout


def render(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_text(overlay)) if d]


def find(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''} in the rendered manifests"
    return found


def pod_spec(obj):
    """The pod spec of a workload object, or None."""
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "Pod":
        return obj["spec"]
    return None


def tool(name: str) -> str:
    for cand in (VENV_BIN / name, NODE_MODULES / ".bin" / name):
        if cand.exists():
            return str(cand)
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed (scripts/test-deploy installs it)")
    return path


@pytest.fixture(scope="session")
def root():
    return ROOT


def ort_dylib() -> str:
    env = os.environ.get("ORT_DYLIB_PATH")
    if env:
        return env
    libs = sorted((ROOT / ".venv/lib").glob("python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*"))
    assert libs, "no libonnxruntime.so in .venv (run scripts/setup)"
    return str(libs[-1])
