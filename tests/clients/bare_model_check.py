#!/usr/bin/env python3
"""Checks a model served as raw tensors through the dispatcher's Open Inference Protocol (v2)
REST API against ONNX Runtime in Python, with NVIDIA's `tritonclient[http]`.

    python3 tests/clients/bare_model_check.py --url http://127.0.0.1:PORT --model NAME \
        --model-dir DIR [--json] [--seed N] [--batch 3] [--skip-metadata]
    python3 tests/clients/bare_model_check.py --model-dir DIR --ort-only    # no server

Reads DIR/model.onnx with onnxruntime, draws random inputs for every graph input (batch
--batch, default 3, for dynamic dimensions; float normal, integers in -3..3, from --seed), sends
them as binary tensors (default, --binary) or JSON (--json), asks for every graph output, and
compares each to onnxruntime's result on the same inputs: same shape, same datatype, floats
within rtol 1e-5 (atol 1e-6), integers and booleans exactly. Unless --skip-metadata, the model's
metadata must list the graph's inputs and outputs with their OIP datatypes and shapes (-1 for a
dynamic dimension). Prints one JSON verdict on stdout; exits 1 on any mismatch.
"""

import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort

# ONNX Runtime's type strings -> numpy dtypes and OIP datatypes.
TYPES = {
    "tensor(float)": (np.float32, "FP32"),
    "tensor(double)": (np.float64, "FP64"),
    "tensor(float16)": (np.float16, "FP16"),
    "tensor(int8)": (np.int8, "INT8"),
    "tensor(int16)": (np.int16, "INT16"),
    "tensor(int32)": (np.int32, "INT32"),
    "tensor(int64)": (np.int64, "INT64"),
    "tensor(uint8)": (np.uint8, "UINT8"),
    "tensor(uint16)": (np.uint16, "UINT16"),
    "tensor(uint32)": (np.uint32, "UINT32"),
    "tensor(uint64)": (np.uint64, "UINT64"),
    "tensor(bool)": (np.bool_, "BOOL"),
}
RTOL, ATOL = 1e-5, 1e-6


def graph_io(sess):
    def desc(a):
        if a.type not in TYPES:
            raise SystemExit(f"bare_model_check: {a.name}: unsupported type {a.type}")
        dtype, datatype = TYPES[a.type]
        shape = [d if isinstance(d, int) and d >= 0 else -1 for d in a.shape]
        return {"name": a.name, "dtype": dtype, "datatype": datatype, "shape": shape}
    return [desc(a) for a in sess.get_inputs()], [desc(a) for a in sess.get_outputs()]


def random_inputs(inputs, batch, seed):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in inputs:
        shape = [batch if d < 0 else d for d in i["shape"]]
        if i["dtype"] == np.bool_:
            a = rng.integers(0, 2, shape).astype(np.bool_)
        elif np.issubdtype(i["dtype"], np.floating):
            a = rng.standard_normal(shape).astype(i["dtype"])
        elif np.issubdtype(i["dtype"], np.unsignedinteger):
            a = rng.integers(0, 4, shape).astype(i["dtype"])
        else:
            a = rng.integers(-3, 4, shape).astype(i["dtype"])
        feeds[i["name"]] = a
    return feeds


def compare(name, want, got):
    """None when got matches want, else why not."""
    if got is None:
        return "missing from the response"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype}, expected {want.dtype}"
    if got.shape != want.shape:
        return f"shape {list(got.shape)}, expected {list(want.shape)}"
    if np.issubdtype(want.dtype, np.floating):
        if not np.allclose(got, want, rtol=RTOL, atol=ATOL):
            worst = float(np.max(np.abs(got.astype(np.float64) - want)))
            return f"values differ (max abs difference {worst:g})"
    elif not np.array_equal(got, want):
        return f"values differ ({int(np.sum(got != want))} of {want.size} elements)"
    return None


def check_metadata(meta, inputs, outputs):
    problems = []
    for kind, expected in (("inputs", inputs), ("outputs", outputs)):
        listed = {t.get("name"): t for t in meta.get(kind, [])}
        if set(listed) != {t["name"] for t in expected}:
            problems.append(f"metadata {kind}: {sorted(listed)}, expected "
                            f"{sorted(t['name'] for t in expected)}")
            continue
        for t in expected:
            m = listed[t["name"]]
            if m.get("datatype") != t["datatype"] or list(m.get("shape", [])) != t["shape"]:
                problems.append(f"metadata {kind} {t['name']}: {m.get('datatype')} "
                                f"{m.get('shape')}, expected {t['datatype']} {t['shape']}")
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", help="the model's name on the server (default: DIR's name)")
    ap.add_argument("--model-dir", required=True)
    enc = ap.add_mutually_exclusive_group()
    enc.add_argument("--binary", dest="binary", action="store_true", default=True,
                     help="binary tensor extension (default)")
    enc.add_argument("--json", dest="binary", action="store_false", help="JSON tensors")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-metadata", action="store_true")
    ap.add_argument("--ort-only", action="store_true",
                    help="no server: print onnxruntime's outputs for the random inputs")
    args = ap.parse_args()
    model = args.model or os.path.basename(os.path.normpath(args.model_dir))

    sess = ort.InferenceSession(os.path.join(args.model_dir, "model.onnx"),
                                providers=["CPUExecutionProvider"])
    inputs, outputs = graph_io(sess)
    feeds = random_inputs(inputs, args.batch, args.seed)
    expected = dict(zip([o["name"] for o in outputs], sess.run(None, feeds)))
    verdict = {
        "model": model,
        "encoding": "binary" if args.binary else "json",
        "batch": args.batch,
        "inputs": {i["name"]: {"datatype": i["datatype"], "shape": list(feeds[i["name"]].shape)}
                   for i in inputs},
        "outputs": {},
        "problems": [],
    }
    if args.ort_only:
        verdict["outputs"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype),
                                  "values": v.tolist()} for k, v in expected.items()}
        verdict["ok"] = True
        print(json.dumps(verdict))
        return

    try:
        exchange(args, model, inputs, outputs, feeds, expected, verdict)
    except Exception as e:  # connection refused, an HTTP error the server answered, ...
        verdict["problems"].append(f"request failed: {type(e).__name__}: {e}")
    verdict["ok"] = not verdict["problems"]
    print(json.dumps(verdict))
    sys.exit(0 if verdict["ok"] else 1)


def exchange(args, model, inputs, outputs, feeds, expected, verdict):
    """Metadata, then one inference; records what differs from ONNX Runtime in verdict."""
    import tritonclient.http as httpclient

    url = args.url.split("://", 1)[-1].rstrip("/")
    client = httpclient.InferenceServerClient(url=url)
    if not args.skip_metadata:
        verdict["problems"] += check_metadata(client.get_model_metadata(model), inputs, outputs)
    infer_inputs = []
    for i in inputs:
        a = feeds[i["name"]]
        t = httpclient.InferInput(i["name"], list(a.shape), i["datatype"])
        t.set_data_from_numpy(a, binary_data=args.binary)
        infer_inputs.append(t)
    requested = [httpclient.InferRequestedOutput(o["name"], binary_data=args.binary)
                 for o in outputs]
    result = client.infer(model, infer_inputs, outputs=requested, request_id="bare-model-check")
    for name, want in expected.items():
        got = result.as_numpy(name)
        why = compare(name, want, got)
        verdict["outputs"][name] = {"ok": why is None, "shape": list(want.shape),
                                    "dtype": str(want.dtype)}
        if why:
            verdict["problems"].append(f"output {name}: {why}")


if __name__ == "__main__":
    main()
