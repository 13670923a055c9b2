"""Asks an agent's Unix socket for one inference of every sample digit
(models/digits/samples.json) and checks the answers against the labels;
exits 1 if more than one is wrong. With --wait-ready SECS, first waits until
the agent serves the digits model (it may still be fetching it).

    python3 cross/check-digits.py SOCKET [--wait-ready SECS]
"""
import argparse
import json
import sys
import time

import agent_socket


def request(path, method, url, body=None):
    headers = {"Content-Type": "application/json"} if body else {}
    status, _, data = agent_socket.request(path, method, url, body, headers, timeout=60)
    return status, data


def main():
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("--wait-ready", type=float, default=0)
    args = p.parse_args()
    deadline = time.time() + args.wait_ready
    while args.wait_ready:
        try:
            if request(args.socket, "GET", "/v2/models/digits/ready")[0] == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            sys.exit("the agent never served digits")
        time.sleep(0.5)
    samples = json.load(open("models/digits/samples.json"))
    right = 0
    for x, label in zip(samples["inputs"], samples["labels"]):
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x}]}
        status, data = request(args.socket, "POST", "/v2/models/digits/infer", json.dumps(body))
        out = json.loads(data)
        if status != 200:
            sys.exit(f"HTTP {status}: {out}")
        scores = out["outputs"][0]["data"]
        right += max(range(len(scores)), key=scores.__getitem__) == label
    print(f"{right} of {len(samples['labels'])} digits right")
    sys.exit(0 if right >= len(samples["labels"]) - 1 else 1)


main()
