#!/usr/bin/env python3
"""Known answers for the real models in models/: computes them with ONNX Runtime in Python,
feeding each graph exactly what its model.toml declares, and writes or checks
tests/known_answers.json.

    python3 tests/clients/known_answers.py            # check the file against ONNX Runtime
    python3 tests/clients/known_answers.py --write    # (re)write it

Needs numpy and onnxruntime; the image models also need Pillow (not in the project's .venv).

Image preprocessing, as the worker does it: decode, expand grey or drop alpha to RGB, resize to
width x height with a bilinear convolution filter (Pillow's BILINEAR, the same kind of filter as
the worker's fast_image_resize Convolution(Bilinear)) to uint8, then channel order, then for a
float32 graph ((p * scale) - mean[c]) / std[c], then layout. Only resize = "stretch" is
implemented here (what the models below declare).

Each case's expected label must be the top-1 class, with at least MIN_MARGIN between it and the
runner-up; the recorded probabilities are ONNX Runtime's (Python, CPU), for tolerance
comparisons: the same pipeline reproduces them within 1e-5; a worker whose resize rounds a
little differently should stay within 0.02 for the image models.
"""

import argparse
import json
import os
import sys
import tomllib

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "known_answers.json")
MIN_MARGIN = 0.8

# Iris rows from sklearn.datasets.load_iris (0-based row index into its 150 rows): for each class
# the row the model is surest of. The values are the data set's own (cm).
IRIS_ROWS = [
    (32, [5.2, 4.1, 1.5, 0.1], "setosa"),
    (62, [6.0, 2.2, 4.0, 1.0], "versicolor"),
    (118, [7.7, 2.6, 6.9, 2.3], "virginica"),
]
TEXT_IMAGES = [
    ("tests/samples/text/text_upright.png", "0"),
    ("tests/samples/text/text_rotated180.png", "180"),
]
PERSON_IMAGES = [
    ("tests/samples/astronaut.png", 1),
    ("tests/samples/camera.png", 1),
    ("tests/samples/chelsea.png", 0),
    ("tests/samples/coffee.png", 0),
]


def load(name):
    d = os.path.join(ROOT, "models", name)
    with open(os.path.join(d, "model.toml"), "rb") as f:
        spec = tomllib.load(f)
    sess = ort.InferenceSession(os.path.join(d, spec["file"]), providers=["CPUExecutionProvider"])
    return spec, sess


def image_tensor(spec, path):
    from PIL import Image

    inp = spec["input"]
    if inp.get("resize", "stretch") != "stretch":
        raise NotImplementedError(f"resize = {inp['resize']!r}")
    img = Image.open(os.path.join(ROOT, path)).convert("RGB")
    img = img.resize((inp["width"], inp["height"]), Image.Resampling.BILINEAR)
    px = np.asarray(img, dtype=np.uint8)  # H, W, 3 RGB
    if inp.get("channels", "rgb") == "bgr":
        px = px[:, :, ::-1]
    if inp["dtype"] == "uint8":
        x = px.copy()
    else:
        x = px.astype(np.float32) * np.float32(inp.get("scale", 1.0))
        x = (x - np.array(inp.get("mean", [0, 0, 0]), np.float32)) / np.array(
            inp.get("std", [1, 1, 1]), np.float32)
        x = x.astype(inp["dtype"])
    if inp["layout"] == "nchw":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[np.newaxis])


def label_of(spec, cls):
    return spec.get("labels", {}).get(str(cls), f"class_{cls}")


def classification_case(spec, probs, expected):
    out = spec["output"]
    assert not out.get("softmax", False)
    order = np.argsort(-probs, kind="stable")
    top = int(order[0])
    margin = float(probs[order[0]] - probs[order[1]])
    got = label_of(spec, top)
    if got != expected or margin < MIN_MARGIN:
        sys.exit(f"{spec['name']}: expected {expected!r}, got {got!r} (margin {margin:.4f})")
    return {
        "expected_label": expected,
        "expected_class": top,
        "probabilities": [float(p) for p in probs],
        "top_k": [{"class": int(c), "label": label_of(spec, int(c)), "score": float(probs[c])}
                  for c in order[: out.get("top_k", len(probs))]],
    }


def iris():
    spec, sess = load("iris-classifier")
    name = sess.get_inputs()[0].name
    cases = []
    for row, values, expected in IRIS_ROWS:
        x = np.array([values], np.float32)
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {name: x})))
        case = {"name": f"load_iris row {row}",
                "input": {"tensor": name, "dtype": "float32", "shape": [1, 4], "data": values}}
        case.update(classification_case(spec, outs[spec["output"]["tensor"]][0], expected))
        case["outputs"] = {"label": outs["label"].tolist()}
        if outs["label"][0] != case["expected_class"]:
            sys.exit("iris: label output disagrees with the probabilities' argmax")
        cases.append(case)
    return {"model_dir": "models/iris-classifier", "input": "raw tensor", "cases": cases}


def text_orientation():
    spec, sess = load("ppocr-textline-orientation")
    cases = []
    for path, expected in TEXT_IMAGES:
        x = image_tensor(spec, path)
        probs = sess.run([spec["output"]["tensor"]], {spec["input"]["tensor"]: x})[0][0]
        case = {"name": os.path.basename(path), "image": path}
        case.update(classification_case(spec, probs, expected))
        cases.append(case)
    return {"model_dir": "models/ppocr-textline-orientation", "input": "image", "cases": cases}


def person():
    spec, sess = load("ssdlite-person")
    out = spec["output"]
    names = [out["num_detections"], out["boxes"], out["scores"], out["classes"]]
    cases = []
    for path, expected in PERSON_IMAGES:
        n, boxes, scores, classes = sess.run(names, {spec["input"]["tensor"]: image_tensor(spec, path)})
        n = int(n[0])
        keep = [i for i in range(n) if scores[0, i] >= out["score_threshold"]]
        dets = [{"label": label_of(spec, int(classes[0, i])), "score": float(scores[0, i]),
                 "box": [float(v) for v in boxes[0, i]]} for i in keep]
        persons = sum(d["label"] == "person" for d in dets)
        if persons != expected:
            sys.exit(f"ssdlite-person: {path}: {persons} persons, expected {expected}")
        cases.append({"name": os.path.basename(path), "image": path,
                      "expected_persons": expected, "detections": dets})
    return {"model_dir": "models/ssdlite-person", "input": "image",
            "score_threshold": out["score_threshold"], "cases": cases}


def compare(want, got, path="$"):
    """Exact on everything but floats, which must agree within 1e-5 (absolute)."""
    if isinstance(want, float) or isinstance(got, float):
        if not abs(float(want) - float(got)) <= 1e-5:
            return [f"{path}: {want} != {got}"]
        return []
    if isinstance(want, dict) and isinstance(got, dict):
        if want.keys() != got.keys():
            return [f"{path}: keys {sorted(want)} != {sorted(got)}"]
        return [e for k in want for e in compare(want[k], got[k], f"{path}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: length {len(want)} != {len(got)}"]
        return [e for i, (a, b) in enumerate(zip(want, got)) for e in compare(a, b, f"{path}[{i}]")]
    return [] if want == got else [f"{path}: {want!r} != {got!r}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="rewrite tests/known_answers.json")
    args = ap.parse_args()
    doc = {
        "about": "Known answers for models/*: ONNX Runtime (Python, CPU) on the inputs below, fed "
                 "as each model.toml declares. Written by tests/clients/known_answers.py. "
                 "Probabilities and scores are for tolerance comparisons: within 1e-5 on the same "
                 "preprocessing, about 0.02 for an image resized by another bilinear implementation.",
        "onnxruntime": ort.__version__,
        "models": {
            "iris-classifier": iris(),
            "ppocr-textline-orientation": text_orientation(),
            "ssdlite-person": person(),
        },
    }
    if args.write:
        with open(OUT, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"wrote {OUT}")
        return
    with open(OUT) as f:
        want = json.load(f)
    want.pop("onnxruntime", None)
    doc.pop("onnxruntime")
    errors = compare(want, json.loads(json.dumps(doc)))
    if errors:
        print("\n".join(errors[:20]))
        sys.exit(f"known_answers: {len(errors)} mismatches")
    print("known_answers: all cases agree")


if __name__ == "__main__":
    main()
