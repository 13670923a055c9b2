"""Baseline (d): what many users deploy instead of an agent, a small
FastAPI + onnxruntime server on loopback, speaking the same Open Inference
Protocol v2 JSON as the agent (so one client measures both).

Usage: fastapi_server.py MODEL_NAME MODEL.onnx PORT
"""
import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request

name, path, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
app = FastAPI()


@app.get("/v2/health/ready")
def ready():
    return {"ready": True}


@app.post(f"/v2/models/{name}/infer")
async def infer(request: Request):
    body = await request.json()
    feed = {
        i["name"]: np.asarray(i["data"], dtype=np.float32).reshape(i["shape"])
        for i in body["inputs"]
    }
    outputs = session.run(None, feed)
    return {
        "model_name": name,
        "outputs": [
            {"name": o.name, "datatype": "FP32", "shape": list(v.shape), "data": v.ravel().tolist()}
            for o, v in zip(session.get_outputs(), outputs)
        ],
    }


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
