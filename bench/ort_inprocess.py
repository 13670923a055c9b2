"""Baseline (c): onnxruntime in Python, in-process, single thread.

Usage: ort_inprocess.py MODEL.onnx INPUT_NAME SHAPE(comma) RUNS
Reads float32 input bytes from stdin, runs the model RUNS times after a
warm-up and prints one JSON line: {"p50_ms", "p99_ms", "rss_kib"}.
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    model, name, shape, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    shape = [int(d) for d in shape.split(",")]
    data = np.frombuffer(sys.stdin.buffer.read(), dtype=np.float32).reshape(shape)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    feed = {name: data}
    for _ in range(20):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1000.0)
    times.sort()
    print(json.dumps({
        "p50_ms": times[len(times) // 2],
        "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))],
        "rss_kib": rss_kib(),
    }))


if __name__ == "__main__":
    main()
