#!/usr/bin/env python3
"""Build the edgefleet example classifier: a tiny 8x8 handwritten-digit MLP.

What it does
------------
1. Loads scikit-learn's bundled ``load_digits`` data set (1797 8x8 images,
   64 features with integer values 0..16, 10 classes; shipped inside the
   scikit-learn wheel, so nothing is downloaded) and splits it with
   ``train_test_split(test_size=0.25, random_state=0, stratify=y)``.
2. Trains ``MLPClassifier(hidden_layer_sizes=(64,), random_state=0,
   max_iter=1000)`` (default adam solver; it converges in ~340 epochs) on the
   pixels scaled by 1/16.
3. Writes the ONNX graph by hand with ``onnx.helper`` (no skl2onnx, no ZipMap):

       input [batch, 64] float32   (raw pixels, 0..16)
         -> Gemm(W1', b1) -> Relu -> Gemm(W2, b2) -> Softmax(axis=-1)
       probabilities [batch, 10] float32

   (Gemm with alpha=beta=1, transA=transB=0, i.e. x @ W + b.)
   The 1/16 input scaling is FOLDED into the first layer: W1' = W1 / 16.
   (x/16) @ W1 == x @ (W1/16), so the model takes the raw 0..16 pixel values
   and there is no separate Mul node.  opset 13, ir_version 8, ai.onnx ops only.
   -> ``digits_fp32.onnx``
4. Quantizes it statically with onnxruntime (QDQ format, per-tensor,
   activations QUInt8, weights QInt8, biases int32 (Gemm), MinMax calibration
   on the first 200 training samples), with three deliberate choices:
   - the Softmax node is excluded from quantization, so the graph ends with
     DequantizeLinear -> Softmax (float) -> probabilities;
   - the Relu node is kept (``QDQKeepRemovableActivations``) instead of being
     folded into the saturation of a uint8 QuantizeLinear, so the int8 graph
     has the same float op sequence as the fp32 one;
   - the input's quantization is pinned to scale 1/8, zero point 0
     (``TensorQuantOverrides``) instead of the calibrated 16/255: every integer
     pixel value 0..16 is then exactly representable (q = 8*x, no rounding),
     and a power-of-two scale gives bit-identical results in runtimes that
     multiply by 1/scale instead of dividing by scale.
   -> ``digits_int8.onnx``
5. Runs ``onnx.checker`` on both, checks both run in onnxruntime with batch
   sizes 1 and 5 (the batch dim is symbolic), measures test-set accuracy of sklearn, the
   fp32 model and the int8 model (onnxruntime, CPU) plus the largest absolute
   difference between fp32 and int8 probabilities over the test set.
   -> ``accuracy.json``
6. Writes the first 16 test samples with their labels and both models'
   probabilities (rounded to 6 decimals) so Rust tests can check predictions
   without Python.
   -> ``samples.json``

Everything is seeded and BLAS runs single-threaded; rerunning with the pinned
requirements gives byte-identical files (check with ``git diff`` or
``sha256sum``).  onnxruntime prints a "consider pre-processing" warning during
quantization; it is harmless for this graph.

How to rerun
------------
    cd models/digits
    python3 -m venv .venv
    .venv/bin/pip install -r requirements.txt
    .venv/bin/python make_digits_model.py

Outputs are written next to this script, whatever the working directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# Single-threaded BLAS/OpenMP for reproducible floating-point sums.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

HERE = Path(__file__).resolve().parent
FP32_PATH = HERE / "digits_fp32.onnx"
INT8_PATH = HERE / "digits_int8.onnx"
ACCURACY_PATH = HERE / "accuracy.json"
SAMPLES_PATH = HERE / "samples.json"
PERTURBED_PATH = HERE / "digits_perturbed.onnx"
TEST_SET_PATH = HERE / "test_set.json"

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
SOFTMAX_NODE = "softmax"
OPSET = 13
IR_VERSION = 8
N_CALIBRATION = 200
N_SAMPLES = 16
PIXEL_SCALE = 1.0 / 16.0
# Gaussian noise added to every weight of the perturbed model, in units of
# that layer's weight standard deviation: enough to lose a clear share of
# its agreement with the fp32 model, as a badly trained or corrupted
# candidate would.
PERTURB_SIGMA = 1.0
PERTURB_SEED = 7
# uint8 quantization of the raw input: q = x / 0.125, so pixels 0..16 -> 0..128
# exactly; representable range 0..31.875.
INPUT_Q_SCALE = 0.125
INPUT_Q_ZERO_POINT = 0


def load_split():
    digits = load_digits()
    x = digits.data.astype(np.float32)  # raw 0..16
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def train(x_train, y_train) -> MLPClassifier:
    clf = MLPClassifier(hidden_layer_sizes=(64,), random_state=0, max_iter=1000)
    clf.fit(x_train * PIXEL_SCALE, y_train)
    return clf


def build_fp32_model(clf: MLPClassifier) -> onnx.ModelProto:
    w1, w2 = clf.coefs_
    b1, b2 = clf.intercepts_
    # Fold the 1/16 input scaling into the first layer's weights.
    w1 = (w1 * PIXEL_SCALE).astype(np.float32)
    w2 = w2.astype(np.float32)
    b1 = b1.astype(np.float32)
    b2 = b2.astype(np.float32)
    n_in = w1.shape[0]
    n_out = w2.shape[1]

    initializers = [
        numpy_helper.from_array(w1, "fc1.weight"),
        numpy_helper.from_array(b1, "fc1.bias"),
        numpy_helper.from_array(w2, "fc2.weight"),
        numpy_helper.from_array(b2, "fc2.bias"),
    ]
    # Gemm rather than MatMul+Add: the quantizer then stores the biases as
    # int32 (scale = input_scale * weight_scale) instead of as uint8
    # activations, which halves the fp32-vs-int8 probability error.
    nodes = [
        helper.make_node("Gemm", [INPUT_NAME, "fc1.weight", "fc1.bias"], ["fc1.out"], name="fc1"),
        helper.make_node("Relu", ["fc1.out"], ["relu.out"], name="relu"),
        helper.make_node("Gemm", ["relu.out", "fc2.weight", "fc2.bias"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], name=SOFTMAX_NODE, axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n_in])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_out])],
        initializer=initializers,
        doc_string=(
            "8x8 digit classifier (sklearn load_digits). Input: raw pixel values 0..16, "
            "float32 [batch, 64]. Output: class probabilities float32 [batch, 10]. "
            "The 1/16 pixel scaling is folded into fc1.weight."
        ),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgefleet-make_digits_model",
        producer_version="1",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


class DigitsReader(CalibrationDataReader):
    """Feeds the calibration samples one batch (of all of them) at a time."""

    def __init__(self, x: np.ndarray):
        self._batches = iter([{INPUT_NAME: x.astype(np.float32)}])

    def get_next(self):
        return next(self._batches, None)


def perturb(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """The fp32 model with seeded noise on both layers' weights: the same
    interface, the same ops, degraded predictions."""
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    rng = np.random.default_rng(PERTURB_SEED)
    for init in model.graph.initializer:
        if init.name.endswith(".weight"):
            w = numpy_helper.to_array(init)
            noisy = w + rng.normal(0.0, PERTURB_SIGMA * float(w.std()), w.shape)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    model.graph.doc_string = (
        "The digits classifier with Gaussian noise on its weights: a degraded "
        "candidate for shadow-mode tests. Same interface as digits_fp32.onnx."
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def quantize(fp32_path: Path, x_calib: np.ndarray) -> onnx.ModelProto:
    # quantize_static writes its output itself; go through a temp file so the
    # final model can be normalised (ir_version) and checked before it lands.
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = Path(tmp) / "digits_int8.onnx"
        quantize_static(
            model_input=str(fp32_path),
            model_output=str(tmp_out),
            calibration_data_reader=DigitsReader(x_calib),
            quant_format=QuantFormat.QDQ,
            per_channel=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[SOFTMAX_NODE],
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
            extra_options={
                "QDQKeepRemovableActivations": True,
                "TensorQuantOverrides": {
                    INPUT_NAME: [
                        {
                            "scale": np.array(INPUT_Q_SCALE, dtype=np.float32),
                            "zero_point": np.array(INPUT_Q_ZERO_POINT, dtype=np.uint8),
                        }
                    ]
                },
            },
        )
        model = onnx.load(str(tmp_out))
    # Keep the int8 file loadable by the same (older) runtimes as the fp32 one.
    model.ir_version = IR_VERSION
    model.producer_name = "edgefleet-make_digits_model"
    model.producer_version = "1"
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    last = model.graph.node[-1]
    assert last.op_type == "Softmax" and last.output[0] == OUTPUT_NAME, last
    assert model.graph.node[-2].op_type == "DequantizeLinear", ops
    assert ops.count("Relu") == 1 and ops.count("Gemm") == 2, ops
    return model


def run(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32)})
    return out


def check_batches(path: Path, x: np.ndarray) -> None:
    """The symbolic batch dim really is dynamic: batch 1 and 5 agree with the full run."""
    full = run(path, x)[:5]
    one = run(path, x[:1])
    five = run(path, x[:5])
    assert one.shape == (1, 10) and five.shape == (5, 10), (one.shape, five.shape)
    assert np.allclose(one[0], full[0], atol=1e-6) and np.allclose(five, full, atol=1e-6)
    assert np.allclose(five.sum(axis=1), 1.0, atol=1e-5)


def rounded(a: np.ndarray, decimals: int = 6) -> list:
    return [[round(float(v), decimals) for v in row] for row in a]


def dump_rows_json(obj: dict) -> str:
    """JSON with one line per key and one line per row of a list of rows."""
    lines = ["{"]
    items = list(obj.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i + 1 < len(items) else ""
        if isinstance(value, list) and value and isinstance(value[0], list):
            rows = [json.dumps(row) for row in value]
            lines.append(f"  {json.dumps(key)}: [")
            lines.extend(f"    {row}," for row in rows[:-1])
            lines.append(f"    {rows[-1]}")
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == obj
    return text


def main() -> None:
    x_train, x_test, y_train, y_test = load_split()
    clf = train(x_train, y_train)
    sk_acc = float((clf.predict(x_test * PIXEL_SCALE) == y_test).mean())

    fp32 = build_fp32_model(clf)
    onnx.save(fp32, str(FP32_PATH))

    int8 = quantize(FP32_PATH, x_train[:N_CALIBRATION])
    onnx.save(int8, str(INT8_PATH))
    onnx.checker.check_model(str(FP32_PATH), full_check=True)
    onnx.checker.check_model(str(INT8_PATH), full_check=True)

    perturbed = perturb(fp32)
    onnx.save(perturbed, str(PERTURBED_PATH))

    check_batches(FP32_PATH, x_test)
    check_batches(INT8_PATH, x_test)
    check_batches(PERTURBED_PATH, x_test)

    p32 = run(FP32_PATH, x_test)
    p8 = run(INT8_PATH, x_test)
    fp32_acc = float((p32.argmax(axis=1) == y_test).mean())
    int8_acc = float((p8.argmax(axis=1) == y_test).mean())
    max_abs_diff = float(np.abs(p32 - p8).max())
    agreement = float((p32.argmax(axis=1) == p8.argmax(axis=1)).mean())
    pp = run(PERTURBED_PATH, x_test)
    perturbed_acc = float((pp.argmax(axis=1) == y_test).mean())
    perturbed_agreement = float((p32.argmax(axis=1) == pp.argmax(axis=1)).mean())

    report = {
        "dataset": "sklearn.datasets.load_digits, test_size=0.25, random_state=0, stratified",
        "n_train": len(y_train),
        "n_test": len(y_test),
        "n_calibration": N_CALIBRATION,
        "sklearn_accuracy": round(sk_acc, 6),
        "fp32_onnx_accuracy": round(fp32_acc, 6),
        "int8_onnx_accuracy": round(int8_acc, 6),
        "fp32_int8_argmax_agreement": round(agreement, 6),
        "max_abs_prob_diff_fp32_vs_int8": round(max_abs_diff, 6),
        "perturbed_onnx_accuracy": round(perturbed_acc, 6),
        "fp32_perturbed_argmax_agreement": round(perturbed_agreement, 6),
        "fp32_onnx_bytes": FP32_PATH.stat().st_size,
        "int8_onnx_bytes": INT8_PATH.stat().st_size,
        "perturbed_onnx_bytes": PERTURBED_PATH.stat().st_size,
        "versions": {
            "numpy": np.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "scikit-learn": __import__("sklearn").__version__,
        },
    }
    ACCURACY_PATH.write_text(json.dumps(report, indent=2) + "\n")

    samples = {
        "description": (
            "First 16 test samples of sklearn load_digits "
            "(train_test_split test_size=0.25, random_state=0, stratify=y). "
            "inputs are raw pixel values 0..16 as fed to the models' 'input'; "
            "probabilities are onnxruntime outputs of 'probabilities', rounded to 6 decimals."
        ),
        "inputs": [[float(v) for v in row] for row in x_test[:N_SAMPLES]],
        "labels": [int(v) for v in y_test[:N_SAMPLES]],
        "fp32_probabilities": rounded(p32[:N_SAMPLES]),
        "int8_probabilities": rounded(p8[:N_SAMPLES]),
    }
    SAMPLES_PATH.write_text(dump_rows_json(samples))

    test_set = {
        "description": (
            "Every test sample of sklearn load_digits (the same split): raw pixel "
            "values 0..16 and labels, for tests that need in-distribution traffic "
            "(drift references, shadow agreement)."
        ),
        "inputs": [[float(v) for v in row] for row in x_test],
        "labels": [int(v) for v in y_test],
    }
    TEST_SET_PATH.write_text(dump_rows_json(test_set))

    for key in (
        "sklearn_accuracy",
        "fp32_onnx_accuracy",
        "int8_onnx_accuracy",
        "fp32_int8_argmax_agreement",
        "max_abs_prob_diff_fp32_vs_int8",
        "perturbed_onnx_accuracy",
        "fp32_perturbed_argmax_agreement",
        "fp32_onnx_bytes",
        "int8_onnx_bytes",
    ):
        print(f"{key}: {report[key]}")


if __name__ == "__main__":
    main()
