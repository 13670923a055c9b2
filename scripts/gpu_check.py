#!/usr/bin/env python3
"""Check the native agent's ONNX Runtime CUDA execution provider (the Jetson
path) on a machine with an NVIDIA GPU.

    scripts/gpu_check.py --agent BIN --ort-lib DIR/libonnxruntime.so.X \
        --models DIR [--out DIR] [--runs 200]

BIN is a native build of the agent (`--features onnxruntime,litert`); the
library is a GPU build of ONNX Runtime (the onnxruntime-gpu wheel's
`onnxruntime/capi/`, with libonnxruntime_providers_{shared,cuda}.so beside
it). The CUDA, cuBLAS, cuRAND, cuFFT and cuDNN libraries are looked for in
every `nvidia/` folder of this Python's site-packages (where the CUDA wheels
put them) and in LD_LIBRARY_PATH. DIR is the test corpus from
scripts/fetch-test-models (models, cases/ and manifest.json).

The agent is started three times over its Unix socket with CUDA offered:
per-model choice, pinned to `onnxruntime-cuda`, pinned to `onnxruntime`
(CPU). Each model's reference case is sent with Triton's binary extension
and compared with the onnxruntime (CPU) reference output; then it is
timed. Exits non-zero when CUDA did not load or any output is wrong.
Standard library only (Python 3.8+).
"""

import argparse
import glob
import http.client
import json
import os
import shutil
import site
import socket
import struct
import subprocess
import sys
import tempfile
import time

MODELS = [
    "ppocr_det",
    "ppocr_cls",
    "oww_embedding",
    "oww_embedding_int8qdq",
]
FORMATS = {"FP32": "f", "INT64": "q", "INT32": "i", "UINT8": "B", "INT8": "b"}


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def cuda_library_dirs():
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    dirs = []
    for root in roots:
        for base, _, files in os.walk(os.path.join(root, "nvidia")):
            if any(".so" in f for f in files) and base not in dirs:
                dirs.append(base)
    return dirs


def read_case(corpus, spec):
    with open(os.path.join(corpus, spec["file"]), "rb") as f:
        return f.read()


def infer(conn, model, case):
    header = {
        "inputs": [
            {
                "name": i["name"],
                "datatype": i["datatype"],
                "shape": i["shape"],
                "parameters": {"binary_data_size": len(i["bytes"])},
            }
            for i in case["inputs"]
        ],
        "outputs": [{"name": o["name"], "parameters": {"binary_data": True}} for o in case["outputs"]],
    }
    head = json.dumps(header).encode()
    body = head + b"".join(i["bytes"] for i in case["inputs"])
    conn.request(
        "POST",
        f"/v2/models/{model}/infer",
        body=body,
        headers={
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(head)),
        },
    )
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{model}: HTTP {resp.status}: {data[:300]!r}")
    n = int(resp.getheader("Inference-Header-Content-Length"))
    meta = json.loads(data[:n])
    out, at = {}, n
    for o in meta["outputs"]:
        size = o["parameters"]["binary_data_size"]
        out[o["name"]] = (o["datatype"], data[at : at + size])
        at += size
    return out


def max_diff(datatype, got, want):
    fmt = FORMATS[datatype]
    width = struct.calcsize(fmt)
    a = struct.unpack(f"<{len(got) // width}{fmt}", got)
    b = struct.unpack(f"<{len(want) // width}{fmt}", want)
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def get(conn, path):
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def run_agent(args, corpus, entries, pin, workdir, env, log):
    sock = os.path.join(workdir, f"agent-{pin or 'auto'}.sock")
    cmd = [
        args.agent, "serve", "--socket", sock,
        "--data-dir", os.path.join(workdir, f"data-{pin or 'auto'}"),
        "--onnxruntime-library", args.ort_lib,
        "--onnxruntime-provider", "cuda",
    ]
    for e in entries:
        cmd += ["--model", f"{e['name']}={os.path.join(corpus, e['file'])}"]
    if pin:
        cmd += ["--runtime", pin]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    started = time.time()
    while time.time() - started < 60:
        if proc.poll() is not None:
            raise RuntimeError(f"agent ({pin or 'auto'}) exited with {proc.returncode}; see its log")
        try:
            status, _ = get(UnixConnection(sock, 2), "/v2/health/ready")
            if status == 200:
                return proc, sock, time.time() - started
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"agent ({pin or 'auto'}) not ready after 60 s (no model served); see its log")


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agent", required=True)
    ap.add_argument("--ort-lib", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--out", default=".")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    corpus = args.models
    manifest = json.load(open(os.path.join(corpus, "manifest.json")))
    entries = []
    for name in MODELS:
        m = next(m for m in manifest["models"] if m["file"] == f"{name}.onnx")
        case = {
            "inputs": [dict(i, bytes=read_case(corpus, i)) for i in m["inputs"]],
            "outputs": [dict(o, bytes=read_case(corpus, o)) for o in m["outputs"]],
        }
        entries.append({"name": name, "file": m["file"], "case": case})

    env = dict(os.environ)
    libdirs = [os.path.dirname(os.path.abspath(args.ort_lib))] + cuda_library_dirs()
    env["LD_LIBRARY_PATH"] = ":".join(libdirs + [env.get("LD_LIBRARY_PATH", "")])
    env.setdefault("EDGEFLEET_LOG", "info")
    print("library folders:", *libdirs, sep="\n  ")
    smi = shutil.which("nvidia-smi")
    if smi:
        print(subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip())

    report = {"models": {}, "starts": {}}
    failures = []
    workdir = tempfile.mkdtemp(prefix="edgefleet-gpu-")
    for pin in [None, "onnxruntime-cuda", "onnxruntime"]:
        label = pin or "auto"
        log_path = os.path.join(args.out, f"agent-{label}.log")
        with open(log_path, "wb") as log:
            try:
                proc, sock, ready_s = run_agent(args, corpus, entries, pin, workdir, env, log)
            except RuntimeError as e:
                failures.append(str(e))
                print(f"{e}\n--- last lines of {log_path}:")
                log.flush()
                print("".join(open(log_path, errors="replace").readlines()[-8:]))
                continue
            report["starts"][label] = round(ready_s, 2)
            try:
                conn = UnixConnection(sock)
                for e in entries:
                    row = report["models"].setdefault(e["name"], {})
                    if pin is None:
                        status, body = get(conn, f"/v2/models/{e['name']}")
                        meta = json.loads(body)
                        row["chosen"] = meta["parameters"]["runtime"]
                        row["trials"] = meta["parameters"]["runtime_trials"]
                    out = infer(conn, e["name"], e["case"])
                    diffs = {}
                    for o in e["case"]["outputs"]:
                        datatype, got = out[o["name"]]
                        diffs[o["name"]] = max_diff(datatype, got, o["bytes"])
                    worst = max(diffs.values())
                    tolerance = 2e-2 if "int8" in e["name"] else 2e-3
                    if worst > tolerance:
                        failures.append(f"{e['name']} ({label}): max |diff| {worst:g} > {tolerance:g}")
                    times = []
                    for i in range(args.runs + 10):
                        t = time.perf_counter()
                        infer(conn, e["name"], e["case"])
                        if i >= 10:
                            times.append((time.perf_counter() - t) * 1000)
                    row[label] = {
                        "max_abs_diff": worst,
                        "p50_ms": round(percentile(times, 0.5), 3),
                        "p99_ms": round(percentile(times, 0.99), 3),
                    }
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    print()
    print("| model | auto choice | in-process p50 per runtime (agent's trials) | socket p50 / p99, CPU pinned | socket p50 / p99, CUDA pinned | max abs diff CUDA vs onnxruntime CPU reference |")
    print("|---|---|---|---|---|---|")
    for name, row in report["models"].items():
        trials = ", ".join(
            f"{t['runtime']} {t['p50_us'] / 1000:.3f} ms" if "p50_us" in t else f"{t['runtime']} {t['status']}"
            for t in row.get("trials", [])
        )
        none = {"p50_ms": "-", "p99_ms": "-", "max_abs_diff": float("nan")}
        cpu, cuda = row.get("onnxruntime", none), row.get("onnxruntime-cuda", none)
        print(
            f"| {name} | {row.get('chosen', '-')} | {trials} | {cpu['p50_ms']} / {cpu['p99_ms']} ms "
            f"| {cuda['p50_ms']} / {cuda['p99_ms']} ms | {cuda['max_abs_diff']:.2g} |"
        )
        if not any(t["runtime"] == "onnxruntime-cuda" and t.get("status") == "ok" for t in row.get("trials", [])):
            failures.append(f"{name}: onnxruntime-cuda was not a verified candidate: {row['trials']}")
    print("\nready after start (s):", report["starts"])
    report["failures"] = failures
    with open(os.path.join(args.out, "gpu-check.json"), "w") as f:
        json.dump(report, f, indent=1)
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
