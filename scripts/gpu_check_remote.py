#!/usr/bin/env python3
"""The GPU machine's side of scripts/gpu-check. Standard library only: nothing can be installed
there, and its PyTorch Python is all we may count on.

  receive DIR          check the parts that have arrived in DIR against DIR/SHA256SUMS; say
                       which are here and which are missing (exit 3 while any is missing)
  remote DIR OUT       join and verify the parts, unpack, find the CUDA libraries, run
                       ember-offline on the GPU (and on the CPU for comparison), write to OUT
  pack STAGE DIR MIB   (here) compress STAGE into DIR as parts of MIB MiB with SHA256SUMS
"""

import glob
import hashlib
import json
import lzma
import os
import subprocess
import sys
import tarfile
import time

BUNDLE = "bundle.tar.xz"


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sums(parts_dir):
    """{name: sha256} from SHA256SUMS, in order; the bundle's own line last."""
    entries = []
    with open(os.path.join(parts_dir, "SHA256SUMS")) as f:
        for line in f:
            digest, name = line.split()
            entries.append((name.lstrip("*"), digest))
    return entries


def receive(parts_dir):
    entries = [(n, d) for n, d in sums(parts_dir) if n != BUNDLE]
    have, missing, bad = [], [], []
    for name, digest in entries:
        path = os.path.join(parts_dir, name)
        if not os.path.exists(path):
            missing.append(name)
        elif sha256(path) != digest:
            bad.append(name)
        else:
            have.append(name)
    print(f"parts here and intact: {len(have)}/{len(entries)} {' '.join(have)}")
    if bad:
        print(f"CORRUPT (send again): {' '.join(bad)}")
    if missing:
        print(f"missing (send next): {' '.join(missing)}")
    return 0 if not missing and not bad else 3


def pack(stage, parts_dir, part_mib):
    os.makedirs(parts_dir, exist_ok=True)
    for old in glob.glob(os.path.join(parts_dir, BUNDLE + ".*")):
        os.remove(old)
    bundle = os.path.join(parts_dir, "..", BUNDLE)
    preset = int(os.environ.get("GPU_CHECK_XZ_PRESET", "9"))
    with tarfile.open(bundle, "w:xz", preset=preset) as tar:
        for entry in sorted(os.listdir(stage)):
            tar.add(os.path.join(stage, entry), arcname=entry)
    size = part_mib << 20
    names = []
    with open(bundle, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(size), b"")):
            name = f"{BUNDLE}.{i:02d}"
            with open(os.path.join(parts_dir, name), "wb") as out:
                out.write(block)
            names.append(name)
    with open(os.path.join(parts_dir, "SHA256SUMS"), "w") as f:
        for name in names:
            f.write(f"{sha256(os.path.join(parts_dir, name))}  {name}\n")
        f.write(f"{sha256(bundle)}  {BUNDLE}\n")
    print(f"{len(names)} parts of at most {part_mib} MiB ({os.path.getsize(bundle) >> 20} MiB in all)")
    return names


def cuda_library_dirs():
    """Directories holding the CUDA 13 / cuDNN 9 libraries the provider needs (the PyTorch
    environment's nvidia-* wheels, a CUDA toolkit, the driver)."""
    wanted = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10",
              "libcudnn.so.9", "libcuda.so.1")
    roots = set()
    try:
        import site
        roots.update(site.getsitepackages())
    except Exception:  # noqa: BLE001 - a Python without site packages still has the others
        pass
    roots.update(["/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/local/lib",
                  "/opt/conda/lib", "/usr/lib64"])
    roots.update(glob.glob("/usr/local/lib/python3*/*-packages"))
    roots.update(glob.glob("/opt/conda/lib/python3*/site-packages"))
    roots.update(glob.glob("/root/.local/lib/python3*/site-packages"))
    roots.update(glob.glob("/usr/lib/python3*/*-packages"))
    found = {}
    for root in sorted(r for r in roots if os.path.isdir(r)):
        for dirpath, _, files in os.walk(root):
            for name in wanted:
                if name not in found and name in files:
                    found[name] = dirpath
    return found


def run(cmd, env, log_path):
    started = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"$ {' '.join(cmd)}  -> exit {code} in {time.time() - started:.1f} s")
    with open(log_path) as log:
        print(log.read()[-3000:])
    return code


def remote(parts_dir, out):
    os.makedirs(out, exist_ok=True)
    if receive(parts_dir) != 0:
        return 3
    base = os.path.abspath(os.path.join(parts_dir, ".."))
    bundle = os.path.join(base, BUNDLE)
    entries = sums(parts_dir)
    with open(bundle, "wb") as joined:
        for name, _ in entries:
            if name != BUNDLE:
                with open(os.path.join(parts_dir, name), "rb") as part:
                    joined.write(part.read())
    want = dict(entries)[BUNDLE]
    if sha256(bundle) != want:
        print("the joined bundle does not match its checksum")
        return 4
    unpacked = os.path.join(base, "run")
    with tarfile.open(bundle, "r:xz") as tar:
        tar.extractall(unpacked)
    binary = os.path.join(unpacked, "bin", "ember-offline")
    os.chmod(binary, 0o755)
    libs = sorted(glob.glob(os.path.join(unpacked, "lib", "libonnxruntime.so*")))
    if not libs:
        print("no libonnxruntime.so in the bundle")
        return 4
    dylib = libs[-1]
    device = os.environ.get("GPU_CHECK_DEVICE", "cuda:0")
    jobs = os.environ.get("GPU_CHECK_JOBS", "512")
    reload_jobs = os.environ.get("GPU_CHECK_RELOAD_JOBS", "10")
    cpu_jobs = os.environ.get("GPU_CHECK_CPU_JOBS", "64")

    env = dict(os.environ)
    found = cuda_library_dirs() if device != "cpu" else {}
    dirs = list(dict.fromkeys(found.values()))
    env["LD_LIBRARY_PATH"] = ":".join(dirs + [os.path.dirname(dylib)]
                                      + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
    env.setdefault("EMBER_LOG", "info,ort=warn")
    facts = {"cuda_libraries": found, "ld_library_path": env["LD_LIBRARY_PATH"]}
    try:
        facts["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        facts["nvidia_smi"] = f"unavailable: {error}"
    print(json.dumps(facts, indent=1))
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(facts, f, indent=1)

    common = [binary, "--model-dir", "models/ssdlite-person", "--images", "tests/samples",
              "--ort-dylib-path", dylib]
    code = run(common + ["--device", device, "--batches", "1,8,32", "--jobs", jobs,
                         "--reload-jobs", reload_jobs, "--out", os.path.join(out, "gpu.json")],
               env, os.path.join(out, "gpu.log"))
    # The same binary and library on this machine's CPUs: the CPU baseline beside the GPU figures.
    run(common + ["--device", "cpu", "--batches", "1,8", "--jobs", cpu_jobs,
                  "--reload-jobs", reload_jobs, "--out", os.path.join(out, "cpu.json")],
        env, os.path.join(out, "cpu.log"))
    return code


def main():
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "receive":
        return receive(sys.argv[2])
    if command == "remote":
        return remote(sys.argv[2], sys.argv[3])
    if command == "pack":
        pack(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
