"""Real models from the test corpus (scripts/fetch-test-models) against an
agent: writes a model's test vector from its reference case, and checks
what an agent serves against the reference outputs.

    python3 cross/check-models.py vector CORPUS FILE > tv.json
    python3 cross/check-models.py check SOCKET NAME CORPUS FILE \
        [--runtime RUNTIME] [--wait-ready SECS]

`vector` takes the case's inputs and the reference runtime's outputs
(onnxruntime or ai_edge_litert, in Python) as the test vector the device
must reproduce before serving the model. `check` waits until the agent
serves NAME, checks that RUNTIME serves it, sends the same inputs over the
Unix socket (binary tensors) and compares every output with the reference,
element by element, within a thousandth of that output's largest value;
exits 1 otherwise.
"""
import argparse
import json
import struct
import sys
import time
from pathlib import Path

from agent_socket import request

FORMATS = {"FP32": "f", "INT64": "q", "INT32": "i", "UINT8": "B", "INT8": "b"}


def model_entry(corpus, file):
    manifest = json.loads((Path(corpus) / "manifest.json").read_text())
    for m in manifest["models"]:
        if m["file"] == file:
            return m
    sys.exit(f"{file} is not in {corpus}/manifest.json")


def values(corpus, tensor):
    raw = (Path(corpus) / tensor["file"]).read_bytes()
    code = FORMATS[tensor["datatype"]]
    return list(struct.unpack("<%d%s" % (len(raw) // struct.calcsize(code), code), raw))


def tolerance(corpus, model):
    # Absolute, per element: a thousandth of the largest reference value
    # (other CPUs and kernels round differently), and at least 1e-4.
    largest = max(abs(x) for o in model["outputs"] for x in values(corpus, o))
    return max(1e-4, 1e-3 * largest)


def vector(args):
    m = model_entry(args.corpus, args.file)
    tensor = lambda t: {
        "name": t["name"], "datatype": t["datatype"], "shape": t["shape"],
        "data": values(args.corpus, t),
    }
    json.dump({
        "inputs": [tensor(t) for t in m["inputs"]],
        "expected": [tensor(t) for t in m["outputs"]],
        "tolerance": tolerance(args.corpus, m),
    }, sys.stdout)


def check(args):
    m = model_entry(args.corpus, args.file)
    deadline = time.time() + args.wait_ready
    while True:
        try:
            status, _, body = request(args.socket, "GET", f"/v2/models/{args.name}")
            if status == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            sys.exit(f"the agent never served {args.name}")
        time.sleep(0.5)
    served_by = json.loads(body).get("parameters", {}).get("runtime")
    if args.runtime and served_by != args.runtime:
        sys.exit(f"{args.name} is served by {served_by}, not {args.runtime}: {body.decode()}")

    # Binary tensors (the Triton extension): a JSON header, then the raw
    # inputs in order; outputs come back the same way.
    blobs = [(Path(args.corpus) / t["file"]).read_bytes() for t in m["inputs"]]
    header = json.dumps({
        "inputs": [
            {"name": t["name"], "datatype": t["datatype"], "shape": t["shape"],
             "parameters": {"binary_data_size": len(b)}}
            for t, b in zip(m["inputs"], blobs)
        ],
        "outputs": [{"name": t["name"], "parameters": {"binary_data": True}} for t in m["outputs"]],
    }).encode()
    status, headers, body = request(
        args.socket, "POST", f"/v2/models/{args.name}/infer", header + b"".join(blobs),
        {"Inference-Header-Content-Length": str(len(header)),
         "Content-Type": "application/octet-stream"})
    if status != 200:
        sys.exit(f"{args.name}: HTTP {status}: {body[:500]!r}")
    length = int({k.lower(): v for k, v in headers.items()}.get("inference-header-content-length", len(body)))
    answer = json.loads(body[:length])
    rest = body[length:]
    outputs = {}
    for o in answer["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size")
        if size is None:
            outputs[o["name"]] = o["data"]
        else:
            code = FORMATS[o["datatype"]]
            outputs[o["name"]] = list(struct.unpack("<%d%s" % (size // struct.calcsize(code), code), rest[:size]))
            rest = rest[size:]
    # Each output against a thousandth of its own largest reference value
    # (at least 1e-4): tighter than the test vector's one tolerance.
    worst, tol = 0.0, 0.0
    for t in m["outputs"]:
        want = values(args.corpus, t)
        tol = max(1e-4, 1e-3 * max(abs(x) for x in want))
        got = outputs.get(t["name"])
        if got is None or len(got) != len(want):
            sys.exit(f"{args.name}: output {t['name']}: {None if got is None else len(got)} values, expected {len(want)}")
        diff = max(abs(a - b) for a, b in zip(got, want))
        worst = max(worst, diff / tol)
        if not diff <= tol:
            sys.exit(f"{args.name}: output {t['name']} differs from the reference by {diff:g} (tolerance {tol:g})")
    print(f"{args.name} ({args.file}) served by {served_by}: {len(m['outputs'])} outputs match the "
          f"{m['reference_runtime']} reference, largest difference {worst:.3g} of its tolerance")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("vector")
    v.add_argument("corpus")
    v.add_argument("file")
    c = sub.add_parser("check")
    c.add_argument("socket")
    c.add_argument("name")
    c.add_argument("corpus")
    c.add_argument("file")
    c.add_argument("--runtime")
    c.add_argument("--wait-ready", type=float, default=0)
    args = p.parse_args()
    vector(args) if args.command == "vector" else check(args)


if __name__ == "__main__":
    main()
