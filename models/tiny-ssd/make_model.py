#!/usr/bin/env python3
"""Builds models/tiny-ssd/model.onnx with the PyPI `onnx` package: a model with the SSD
detector's interface (uint8 NHWC image in; num_detections, boxes, scores, classes out) that does
almost no work, so benchmarks measure Ember's overhead and the broker, not inference.

For each image: score = mean pixel / 255; one detection of class 1 with box
[score, score, score, score]. Deterministic; opset 13.
"""

import os

import onnx
from onnx import TensorProto, helper

here = os.path.dirname(os.path.abspath(__file__))

nodes = [
    helper.make_node("Cast", ["image_tensor:0"], ["f"], to=TensorProto.FLOAT),
    helper.make_node("ReduceMean", ["f"], ["mean"], axes=[1, 2, 3], keepdims=0),  # [N]
    helper.make_node("Div", ["mean", "c255"], ["score"]),  # [N]
    helper.make_node("Unsqueeze", ["score", "axis1"], ["scores"]),  # [N,1]
    helper.make_node("Mul", ["score", "zero"], ["zeros"]),  # [N]
    helper.make_node("Add", ["zeros", "one"], ["num_detections:0"]),  # [N] of 1
    helper.make_node("Add", ["scores", "zero"], ["detection_scores:0"]),  # [N,1]
    helper.make_node("Mul", ["scores", "zero"], ["zeros2"]),
    helper.make_node("Add", ["zeros2", "one"], ["detection_classes:0"]),  # [N,1] of 1
    helper.make_node("Unsqueeze", ["scores", "axis2"], ["s3"]),  # [N,1,1]
    helper.make_node("Concat", ["s3", "s3", "s3", "s3"], ["detection_boxes:0"], axis=2),  # [N,1,4]
]
initializers = [
    helper.make_tensor("c255", TensorProto.FLOAT, [], [255.0]),
    helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
    helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
]
graph = helper.make_graph(
    nodes,
    "tiny-ssd",
    [helper.make_tensor_value_info("image_tensor:0", TensorProto.UINT8, ["N", "H", "W", 3])],
    [
        helper.make_tensor_value_info("num_detections:0", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("detection_boxes:0", TensorProto.FLOAT, ["N", 1, 4]),
        helper.make_tensor_value_info("detection_scores:0", TensorProto.FLOAT, ["N", 1]),
        helper.make_tensor_value_info("detection_classes:0", TensorProto.FLOAT, ["N", 1]),
    ],
    initializers,
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="ember")
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, os.path.join(here, "model.onnx"))
print("wrote", os.path.join(here, "model.onnx"))
