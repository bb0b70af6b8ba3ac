"""Dockerfiles: hadolint (warnings fail), and consistency with the workspace they build."""

import re
import tomllib

import pytest

from conftest import ROOT, run, tool

DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
RUST_IMAGES = {"dispatcher": "ember-dispatcher", "autoscaler": "ember-autoscaler", "worker": "ember-worker", "worker-cuda": "ember-worker"}


def test_the_four_images_exist():
    assert {p.name for p in DOCKERFILES} == {f"{n}.Dockerfile" for n in RUST_IMAGES}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    proc = run([tool("hadolint"), "--failure-threshold", "warning", str(dockerfile)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Inline ignores only with a reason on the line before.
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], f"{dockerfile.name}:{i + 1}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_its_crate_from_the_whole_workspace(dockerfile):
    text = dockerfile.read_text()
    crate = RUST_IMAGES[dockerfile.name.removesuffix(".Dockerfile")]
    assert re.search(r"^FROM rust:1\.95\S* AS build$", text, re.M)
    assert f"cargo build --release --locked -p {crate}" in text
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    copied = set(re.findall(r"^COPY (\S+) \1$", text, re.M))
    assert set(members) <= copied, f"workspace members not copied: {set(members) - copied}"
    assert re.search(r"^COPY Cargo\.toml Cargo\.lock rust-toolchain\.toml \./$", text, re.M)
    # The final stage runs as a numeric non-root user.
    final = text.rsplit("\nFROM ", 1)[1]
    user = re.findall(r"^USER (\d+)(?::(\d+))?$", final, re.M)
    assert user and int(user[-1][0]) > 0
    # Its .dockerignore lets through what it copies.
    ignore = (ROOT / "docker" / f"{dockerfile.name}.dockerignore").read_text()
    for m in members:
        assert f"!{m}/" in ignore


@pytest.mark.parametrize("name", ["worker", "worker-cuda"])
def test_worker_images_carry_the_model_and_onnxruntime(name):
    text = (ROOT / f"docker/{name}.Dockerfile").read_text()
    want = [l.split("==")[1] for l in (ROOT / "scripts/requirements.txt").read_text().split() if l.startswith("onnxruntime==")][0]
    pkg = "onnxruntime-gpu" if name == "worker-cuda" else "onnxruntime"
    assert f"{pkg}=={want}" in text, "the image's ONNX Runtime must be the version the tests use"
    assert f"ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so.{want}" in text
    assert "COPY models/ssdlite-person /opt/ember/models/ssdlite-person" in text
    assert (ROOT / "models/ssdlite-person/model.onnx").exists() and (ROOT / "models/ssdlite-person/model.toml").exists()
    if name == "worker-cuda":
        base = re.findall(r"^FROM (nvidia/cuda:\S+)$", text, re.M)
        assert base and re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base[-1])


def test_manifests_name_the_images_built_here():
    text = " ".join(p.read_text() for p in (ROOT / "manifests").rglob("*.yaml"))
    for image in ("ember-worker", "ember-worker-cuda", "ember-dispatcher", "ember-autoscaler"):
        assert f"ghcr.io/ember-fleet/{image}" in text
    docs = (ROOT / "docs/deploy.md").read_text()
    for name in RUST_IMAGES:
        assert f"docker/{name}.Dockerfile" in docs
