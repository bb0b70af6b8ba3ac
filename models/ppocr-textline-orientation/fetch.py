#!/usr/bin/env python3
"""Reproduces models/ppocr-textline-orientation/model.onnx (and LICENSE's upstream texts) from
the PyPI wheel rapidocr 3.10.0, which ships PaddleOCR's text-line orientation classifier
ch_ppocr_mobile_v2.0_cls as ONNX. Needs only pip (no other package is installed):

    python3 models/ppocr-textline-orientation/fetch.py [--out DIR]

It downloads the pinned wheel with `pip download --no-deps`, checks the wheel's and the model's
sha256, and writes DIR/model.onnx plus DIR/upstream-LICENSE and DIR/MODEL_LICENSES.md
(default DIR: a temporary folder, printed; --out . overwrites the committed copies; LICENSE
beside this file is a short preamble followed by upstream-LICENSE verbatim). The
model file is copied byte for byte, unmodified.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "rapidocr==3.10.0"
WHEEL = "rapidocr-3.10.0-py3-none-any.whl"
WHEEL_SHA256 = "2fc34e26cd0f48514804a94f8832283039c7334076bff60768b1fed9ad068050"
MEMBER = "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx"
MODEL_SHA256 = "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"
LICENCES = {
    "rapidocr-3.10.0.dist-info/licenses/LICENSE": "upstream-LICENSE",
    "rapidocr-3.10.0.dist-info/licenses/MODEL_LICENSES.md": "MODEL_LICENSES.md",
}


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="folder to write model.onnx into (default: a new temporary one)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="ppocr-textline-orientation-")
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as dl:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--only-binary", ":all:", "--dest", dl, PACKAGE],
            check=True,
        )
        path = os.path.join(dl, WHEEL)
        with open(path, "rb") as f:
            got = sha256(f.read())
        if got != WHEEL_SHA256:
            sys.exit(f"fetch: {WHEEL} sha256 {got}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(path) as whl:
            model = whl.read(MEMBER)
            texts = {dst: whl.read(src) for src, dst in LICENCES.items()}
    if sha256(model) != MODEL_SHA256:
        sys.exit(f"fetch: {MEMBER} sha256 {sha256(model)}, expected {MODEL_SHA256}")
    with open(os.path.join(out, "model.onnx"), "wb") as f:
        f.write(model)
    for name, text in texts.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(text)
    print(f"{os.path.join(out, 'model.onnx')}: {len(model)} bytes, sha256 {MODEL_SHA256} (checked)")


if __name__ == "__main__":
    main()
