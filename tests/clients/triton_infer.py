#!/usr/bin/env python3
"""Runs one inference through Ember's Open Inference Protocol endpoint with NVIDIA's own
`tritonclient[http]` or, with --protocol grpc, `tritonclient[grpc]` (the dispatcher's
--grpc-listen port), the way their examples use them (readiness checks, metadata, InferInput
with a numpy array, requested outputs, as_numpy on the result).

The image is a raw uint8 HxWx3 file (--height, --width). Prints a JSON summary on stdout.
"""

import argparse
import json

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("raw_image")
    parser.add_argument("--url", default="127.0.0.1:8080")
    parser.add_argument("--model", default="ssdlite-person")
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--width", type=int, default=300)
    parser.add_argument("--binary", action="store_true", help="use the binary tensor extension")
    parser.add_argument("--version", default="", help="pin a model version (tritonclient's model_version)")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    args = parser.parse_args()

    grpc = args.protocol == "grpc"
    client = (grpcclient if grpc else httpclient).InferenceServerClient(url=args.url)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(args.model, model_version=args.version)
    if grpc:
        metadata = client.get_model_metadata(args.model, model_version=args.version, as_json=True)
    else:
        metadata = client.get_model_metadata(args.model, model_version=args.version)

    image = np.fromfile(args.raw_image, dtype=np.uint8).reshape(1, args.height, args.width, 3)
    names = ["num_detections:0", "detection_boxes:0", "detection_scores:0", "detection_classes:0"]
    if grpc:
        inputs = [grpcclient.InferInput(metadata["inputs"][0]["name"], list(image.shape), "UINT8")]
        inputs[0].set_data_from_numpy(image)
        outputs = [grpcclient.InferRequestedOutput(n) for n in names]
    else:
        inputs = [httpclient.InferInput(metadata["inputs"][0]["name"], list(image.shape), "UINT8")]
        inputs[0].set_data_from_numpy(image, binary_data=args.binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=args.binary) for n in names]
    result = client.infer(args.model, inputs, outputs=outputs, request_id="triton-1",
                          model_version=args.version)

    count = int(result.as_numpy("num_detections:0")[0])
    scores = result.as_numpy("detection_scores:0")[0]
    classes = result.as_numpy("detection_classes:0")[0]
    boxes = result.as_numpy("detection_boxes:0")[0]
    response = result.get_response(as_json=True) if grpc else result.get_response()
    print(json.dumps({
        "id": response.get("id"),
        "model_name": response.get("model_name"),
        "model_version": response.get("model_version"),
        "metadata_inputs": metadata["inputs"],
        "count": count,
        "scores": scores[:count].tolist(),
        "classes": classes[:count].tolist(),
        "boxes": boxes[:count].tolist(),
    }))


if __name__ == "__main__":
    main()
