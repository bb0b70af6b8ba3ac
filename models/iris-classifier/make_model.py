#!/usr/bin/env python3
"""Reproduces models/iris-classifier/model.onnx: a scikit-learn classifier (standard scaling +
multinomial logistic regression) trained on the Iris data set that scikit-learn ships
(sklearn.datasets.load_iris, no download), converted to ONNX with skl2onnx.

A one-off, not part of the project's setup. Pinned versions (a scratch venv, not .venv):

    python3 -m venv /tmp/iris-venv
    /tmp/iris-venv/bin/pip install scikit-learn==1.9.1 skl2onnx==1.20.0 onnx==1.23.2 \
        onnxruntime==1.31.1 numpy==2.4.6
    /tmp/iris-venv/bin/python models/iris-classifier/make_model.py [--out PATH]

Training is deterministic (lbfgs, fixed random_state, all 150 rows), so with these versions the
output is byte-identical to the committed model.onnx (sha256 in SOURCE.md). The script checks the
ONNX graph against scikit-learn on the whole data set before writing.

Interface: input "input" float32 [N, 4] (sepal length, sepal width, petal length, petal width,
in cm); outputs "label" int64 [N] (0 setosa, 1 versicolor, 2 virginica) and "probabilities"
float32 [N, 3]. zipmap is off so both outputs are plain tensors.
"""

import argparse
import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

TARGET_OPSET = 17

here = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(here, "model.onnx"))
    args = ap.parse_args()

    data = load_iris()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=0)
    model = Pipeline([("scale", StandardScaler()), ("logreg", clf)])
    model.fit(x, y)

    onx = convert_sklearn(
        model,
        name="iris-classifier",
        initial_types=[("input", FloatTensorType([None, x.shape[1]]))],
        options={id(clf): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    # skl2onnx 1.20 lists the default domain twice in opset_import; keep one entry per domain.
    opsets = {}
    for op in onx.opset_import:
        opsets[op.domain] = max(op.version, opsets.get(op.domain, 0))
    del onx.opset_import[:]
    for domain, version in sorted(opsets.items()):
        onx.opset_import.append(onnx.helper.make_opsetid(domain, version))
    onx.doc_string = "Iris classifier (StandardScaler + LogisticRegression), Ember models/iris-classifier"
    onnx.checker.check_model(onx)
    blob = onx.SerializeToString()

    # The graph must agree with scikit-learn on every row.
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {"input": x})
    assert label.dtype == np.int64 and proba.dtype == np.float32, (label.dtype, proba.dtype)
    assert (label == model.predict(x)).all()
    np.testing.assert_allclose(proba, model.predict_proba(x), rtol=1e-4, atol=1e-5)
    print("training accuracy", float((label == y).mean()))

    with open(args.out, "wb") as f:
        f.write(blob)
    print(args.out, len(blob), "bytes, sha256", hashlib.sha256(blob).hexdigest())


if __name__ == "__main__":
    main()
