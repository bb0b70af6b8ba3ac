#!/usr/bin/env python3
"""Writes a small random ONNX model that no test in the repository knows: OUT_DIR/model.onnx and
nothing else (no model.toml, so a worker must serve it as raw tensors).

    python3 tests/clients/make_bare_model.py OUT_DIR [--seed N]

Needs the PyPI `onnx` package. The graph (opset 13, IR 8), weights drawn from --seed:

    inputs   x       float32 [batch, 5]
             offset  int64   [batch, 1]
    hidden = Relu(x @ W1 + b1)                               [batch, 8]
    scores = hidden @ W2 + b2 + Cast<float>(offset)          float32 [batch, 4]
    index  = ArgMax(scores, axis 1, keepdims) + offset       int64   [batch, 1]

Two inputs of different dtypes, two outputs of different dtypes, a dynamic batch dimension.
The same seed gives the same bytes.
"""

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES, HIDDEN, OUTPUTS = 5, 8, 4


def build(seed):
    rng = np.random.default_rng(seed)
    weights = {
        "W1": rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32),
        "b1": rng.standard_normal(HIDDEN).astype(np.float32),
        "W2": rng.standard_normal((HIDDEN, OUTPUTS)).astype(np.float32),
        "b2": rng.standard_normal(OUTPUTS).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["xw1"]),
        helper.make_node("Add", ["xw1", "b1"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "W2"], ["hw2"]),
        helper.make_node("Add", ["hw2", "b2"], ["logits"]),
        helper.make_node("Cast", ["offset"], ["offset_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["logits", "offset_f"], ["scores"]),
        helper.make_node("ArgMax", ["scores"], ["argmax"], axis=1, keepdims=1),
        helper.make_node("Add", ["argmax", "offset"], ["index"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"bare-{seed}",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES]),
            helper.make_tensor_value_info("offset", TensorProto.INT64, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", OUTPUTS]),
            helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", 1]),
        ],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="ember-make-bare-model")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "model.onnx")
    onnx.save(build(args.seed), path)
    print(path)


if __name__ == "__main__":
    main()
