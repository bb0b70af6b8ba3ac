"""scripts/gpu-check's carrying mechanism, end to end on this CPU machine: pack the offline binary
and an ONNX Runtime library into checksummed parts, notice a corrupt part, join, verify, unpack and
run the offline pipeline from the unpacked bundle (the CPU library standing in for the GPU one)."""

import json
import os

from conftest import ROOT, run


def test_the_gpu_check_bundle_survives_parts_and_runs_the_offline_pipeline(tmp_path):
    proc = run(["scripts/gpu-check", "selftest"], env={**os.environ, "OUT": str(tmp_path)},
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # The corrupt part was named before the good one was put back.
    assert "CORRUPT (send again): bundle.tar.xz.00" in proc.stdout
    parts = sorted((ROOT / "target/gpu-check/parts").glob("bundle.tar.xz.*"))
    assert len(parts) >= 2, "the self test must split into several parts"
    assert all(p.stat().st_size <= 4 << 20 for p in parts)
    for name in ("gpu", "cpu"):
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["device"] == "cpu"
        # It ran the unpacked library, not the project's.
        assert "target/gpu-check/run/lib/libonnxruntime.so" in report["ort_dylib"]
        found = {c["image"]: [d["label"] for d in c["detections"]] for c in report["check"]}
        assert found["astronaut.png"] == ["person"] and found["coffee.png"] == []
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert "ld_library_path" in facts
