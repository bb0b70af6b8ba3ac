#!/usr/bin/env python3
"""Infers the same tensors through Ember's Open Inference Protocol over gRPC
(`tritonclient[grpc]`) and over REST (`tritonclient[http]`, binary tensors), each the way its
examples use it: readiness, model metadata, InferInput from numpy, every output the metadata
lists requested, as_numpy on the result. Prints a JSON summary of both on stdout; the test
compares them.

The inputs file is a JSON list of {"name", "datatype", "shape"} with either "data" (flat
values) or "raw" (a file of the tensor's little-endian bytes), or a REST infer request body
(its "inputs"). Without --http-url, only gRPC.

With --expect-error CODE it sends the inputs over gRPC only and prints the error tritonclient
raised (its gRPC status and message) instead; exit status 1 when the call did not fail so.
"""

import argparse
import json

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype


def arrays(spec_file):
    with open(spec_file) as f:
        specs = json.load(f)
    if isinstance(specs, dict):  # an OIP REST request body
        specs = specs["inputs"]
    out = []
    for spec in specs:
        dtype = triton_to_np_dtype(spec["datatype"])
        if "raw" in spec:
            array = np.fromfile(spec["raw"], dtype=dtype)
        else:
            array = np.array(spec["data"], dtype=dtype)
        out.append((spec["name"], spec["datatype"], array.reshape(spec["shape"])))
    return out


def infer(module, client, model, tensors, output_names, version, headers, **binary):
    inputs = []
    for name, datatype, array in tensors:
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, **binary)
        inputs.append(tensor)
    binary_out = {"binary_data": True} if binary else {}
    outputs = [module.InferRequestedOutput(n, **binary_out) for n in output_names]
    result = client.infer(model, inputs, outputs=outputs, request_id="compare-1",
                          model_version=version, headers=headers)
    tensors_out = {}
    for name in output_names:
        array = result.as_numpy(name)
        tensors_out[name] = {
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "data": array.flatten().tolist(),
        }
    return tensors_out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs")
    parser.add_argument("--grpc-url", required=True)
    parser.add_argument("--http-url")
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", default="")
    parser.add_argument("--token", help="bearer token")
    parser.add_argument("--timeout", type=float, help="gRPC client_timeout (seconds)")
    parser.add_argument("--expect-error", help="the gRPC status expected, e.g. NOT_FOUND")
    args = parser.parse_args()
    headers = {"authorization": f"Bearer {args.token}"} if args.token else None
    tensors = arrays(args.inputs)

    grpc = grpcclient.InferenceServerClient(url=args.grpc_url)
    if args.expect_error:
        inputs = []
        for name, datatype, array in tensors:
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            grpc.infer(args.model, inputs, model_version=args.version, headers=headers,
                       client_timeout=args.timeout)
        except InferenceServerException as error:
            status = error.status() or ""
            print(json.dumps({"status": status, "message": error.message()}))
            raise SystemExit(0 if status == f"StatusCode.{args.expect_error}" else 1)
        print(json.dumps({"status": "OK"}))
        raise SystemExit(1)

    assert grpc.is_server_live()
    assert grpc.is_server_ready()
    assert grpc.is_model_ready(args.model, model_version=args.version, headers=headers)
    server = grpc.get_server_metadata(headers=headers, as_json=True)
    grpc_meta = grpc.get_model_metadata(args.model, model_version=args.version,
                                        headers=headers, as_json=True)
    names = [o["name"] for o in grpc_meta["outputs"]]
    summary = {
        "server": server,
        "grpc_metadata": grpc_meta,
        "grpc": infer(grpcclient, grpc, args.model, tensors, names, args.version, headers),
    }
    if args.http_url:
        http = httpclient.InferenceServerClient(url=args.http_url)
        assert http.is_model_ready(args.model, model_version=args.version, headers=headers)
        summary["http_metadata"] = http.get_model_metadata(args.model, model_version=args.version,
                                                           headers=headers)
        summary["http"] = infer(httpclient, http, args.model, tensors, names, args.version,
                                headers, binary_data=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
