//! The Open Inference Protocol v2 codec, with no I/O: decoding an
//! inference request (JSON, or JSON followed by raw tensors under the
//! binary tensor extension) into tensors, and encoding outputs, model
//! metadata and statistics as the protocol's JSON. The [`super::server`]
//! moves the bytes; everything here is a plain function of its inputs.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::IoSpec;
use crate::registry::ServedModel;
use crate::tensor::{self, DataType, Tensor, TensorData};

/// Name of the header that splits a binary-extension body into its JSON
/// part and the raw tensor bytes that follow.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Why an inference request cannot be decoded. Each is the client's to
/// fix, and says how.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(
        "Inference-Header-Content-Length is {header_len} but the body has only {body_len} bytes"
    )]
    HeaderBeyondBody { header_len: usize, body_len: usize },
    #[error("malformed inference request JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("input {input:?}: {reason}")]
    BadInput { input: String, reason: String },
    #[error("input {input:?} has both \"data\" and binary_data_size; send one")]
    DataAndBinary { input: String },
    #[error("input {input:?} has neither \"data\" nor parameters.binary_data_size")]
    NoData { input: String },
    #[error("input {input:?} declares binary_data_size {declared} but only {remaining} binary bytes remain (truncated body?)")]
    BinaryTruncated {
        input: String,
        declared: usize,
        remaining: usize,
    },
    #[error("{bytes} bytes of binary data follow the inputs that no input's binary_data_size accounts for")]
    BinaryLeftOver { bytes: usize },
    #[error(transparent)]
    Data(#[from] tensor::DecodeError),
}

#[derive(Deserialize, Default)]
struct RequestParameters {
    binary_data_output: Option<bool>,
    /// Identifies the client for an A/B split when the request carries
    /// no `X-Client-Key` header. A string, or a number taken as its
    /// decimal text.
    client_key: Option<Value>,
}

#[derive(Deserialize)]
struct InferRequest<'a> {
    id: Option<String>,
    #[serde(default)]
    parameters: Option<RequestParameters>,
    #[serde(borrow)]
    inputs: Vec<InferInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize, Default)]
struct InputParameters {
    binary_data_size: Option<usize>,
}

#[derive(Deserialize)]
struct InferInput<'a> {
    name: String,
    shape: Vec<usize>,
    datatype: String,
    #[serde(default)]
    parameters: Option<InputParameters>,
    /// Kept as text (borrowed from the body, not copied) and decoded once
    /// the datatype is known, straight into typed elements (no JSON tree
    /// for large tensors).
    #[serde(default, borrow)]
    data: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize, Default)]
struct OutputParameters {
    binary_data: Option<bool>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Option<OutputParameters>,
}

/// A decoded request: its id, input tensors and the outputs asked for
/// (`None`: all), each with whether to return it as binary.
#[derive(Debug)]
pub struct Decoded {
    /// The client's request id, echoed in the answer.
    pub id: Option<String>,
    /// The input tensors, in request order.
    pub inputs: Vec<Tensor>,
    /// The outputs asked for by name, each with whether it goes back as
    /// binary; `None` asks for every output.
    pub wanted: Option<Vec<(String, bool)>>,
    /// Whether outputs not named go back as binary.
    pub binary_by_default: bool,
    /// The request's `client_key` parameter (A/B splits).
    pub client_key: Option<String>,
}

/// Splits `body` per the binary tensor extension (`header_len`: the
/// [`HEADER_LENGTH`] header, when sent) and decodes every input.
pub fn decode_request(header_len: Option<usize>, body: &[u8]) -> Result<Decoded, RequestError> {
    let (json_part, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(RequestError::HeaderBeyondBody {
                header_len: n,
                body_len: body.len(),
            })
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    // The inputs' data arrays are cut out first (see `cut_data_arrays`);
    // serde_json reads the rest. Should that fail, it reads the whole
    // JSON again, so a malformed request is described as it was sent.
    let cut = cut_data_arrays(json_part);
    let parsed = match &cut {
        Some(cut) => serde_json::from_slice::<InferRequest>(&cut.rest).ok(),
        None => None,
    };
    let (request, arrays) = match (parsed, &cut) {
        (Some(request), Some(cut)) => (request, cut.arrays.as_slice()),
        _ => (
            serde_json::from_slice::<InferRequest>(json_part).map_err(RequestError::Json)?,
            &[][..],
        ),
    };
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (ordinal, mut input) in request.inputs.into_iter().enumerate() {
        let cut_out = arrays.get(ordinal).copied().flatten();
        let data_text = match (cut_out, input.data.take()) {
            (Some(text), _) => Some(text),
            (None, data) => data.map(serde_json::value::RawValue::get),
        };
        let bad = |reason: String| RequestError::BadInput {
            input: input.name.clone(),
            reason,
        };
        let datatype: DataType = input.datatype.parse().map_err(bad)?;
        let binary_size = input.parameters.and_then(|p| p.binary_data_size);
        let data = match (binary_size, data_text) {
            (Some(_), Some(_)) => return Err(RequestError::DataAndBinary { input: input.name }),
            (Some(size), None) => {
                if size > binary.len() {
                    return Err(RequestError::BinaryTruncated {
                        input: input.name,
                        declared: size,
                        remaining: binary.len(),
                    });
                }
                let (chunk, rest) = binary.split_at(size);
                binary = rest;
                TensorData::from_le_bytes(datatype, chunk).map_err(bad)?
            }
            (None, Some(text)) => {
                let expected = Tensor::element_count(&input.shape).unwrap_or(0);
                TensorData::from_json_text(&input.name, datatype, text, expected)?
            }
            (None, None) => return Err(RequestError::NoData { input: input.name }),
        };
        inputs.push(Tensor {
            name: input.name,
            shape: input.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(RequestError::BinaryLeftOver {
            bytes: binary.len(),
        });
    }
    let (binary_by_default, client_key) = match request.parameters {
        Some(p) => (
            p.binary_data_output.unwrap_or(false),
            p.client_key.and_then(|k| match k {
                Value::String(s) => Some(s),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }),
        ),
        None => (false, None),
    };
    let wanted = request.outputs.map(|outputs| {
        outputs
            .into_iter()
            .map(|o| {
                let binary = o
                    .parameters
                    .and_then(|p| p.binary_data)
                    .unwrap_or(binary_by_default);
                (o.name, binary)
            })
            .collect()
    });
    Ok(Decoded {
        id: request.id,
        inputs,
        wanted,
        binary_by_default,
        client_key,
    })
}

/// A request's JSON with its inputs' `data` arrays cut out.
struct CutArrays<'a> {
    /// The JSON with each cut-out array replaced by `[]`.
    rest: Vec<u8>,
    /// Per input, in order: the text of its `data` array, if cut out.
    arrays: Vec<Option<&'a str>>,
}

/// Finds the `data` arrays of the request's inputs (`inputs[i].data`) and
/// cuts them out of the JSON. serde_json would otherwise go through every
/// number of them once just to find where they end (and again to decode
/// them); here the end is found by jumping between brackets and quotes,
/// and the numbers are read once, by the typed decoder, which checks
/// them. Everything else is left to serde_json, which checks it when it
/// reads `rest`. `None` when the JSON is not laid out as expected (or is
/// malformed): the caller then reads it whole with serde_json.
fn cut_data_arrays(json: &[u8]) -> Option<CutArrays<'_>> {
    let mut w = Walker { b: json, i: 0 };
    let mut arrays = Vec::new();
    let mut spans = Vec::new();
    w.object(|w, key| {
        if key != b"inputs" {
            return w.skip_value();
        }
        w.array(|w| {
            let mut cut = None;
            w.object(|w, key| {
                if key == b"data" && w.peek() == Some(b'[') {
                    let start = w.i;
                    w.skip_value()?;
                    cut = Some(start..w.i);
                    Some(())
                } else {
                    w.skip_value()
                }
            })?;
            if let Some(span) = &cut {
                spans.push(span.clone());
            }
            arrays.push(cut);
            Some(())
        })
    })?;
    w.ws();
    if w.i != json.len() {
        return None;
    }
    let mut rest = Vec::with_capacity(
        json.len() - spans.iter().map(|s| s.len()).sum::<usize>() + 2 * spans.len(),
    );
    let mut from = 0;
    for span in &spans {
        rest.extend_from_slice(&json[from..span.start]);
        rest.extend_from_slice(b"[]");
        from = span.end;
    }
    rest.extend_from_slice(&json[from..]);
    let arrays = arrays
        .into_iter()
        .map(|span| match span {
            Some(span) => std::str::from_utf8(&json[span]).ok().map(Some),
            None => Some(None),
        })
        .collect::<Option<Vec<_>>>()?;
    Some(CutArrays { rest, arrays })
}

/// A cursor over JSON text that knows just enough of the grammar to find
/// where values end; every method returns `None` on anything unexpected.
struct Walker<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Walker<'a> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A string; returns its text between the quotes, escapes as sent.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            let at = self.i + memchr::memchr2(b'"', b'\\', self.b.get(self.i..)?)?;
            if self.b[at] == b'"' {
                self.i = at + 1;
                return Some(&self.b[start..at]);
            }
            self.i = at + 2;
        }
    }

    /// An object, calling `field` with the cursor on each value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            field(self, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An array, calling `element` with the cursor on each element.
    fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        if self.eat(b']').is_some() {
            return Some(());
        }
        loop {
            element(self)?;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Moves past one value. An array is skipped by counting square
    /// brackets (and stepping over strings), an object by counting braces,
    /// without looking at what lies between: in valid JSON the two kinds
    /// nest, so either count alone finds the end, and whoever reads the
    /// value checks it.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            open @ (b'[' | b'{') => {
                let close = if open == b'[' { b']' } else { b'}' };
                let mut depth = 0usize;
                loop {
                    let at = self.i + memchr::memchr3(b'"', open, close, self.b.get(self.i..)?)?;
                    self.i = at;
                    if self.b[at] == b'"' {
                        self.string()?;
                    } else if self.b[at] == open {
                        depth += 1;
                        self.i += 1;
                    } else {
                        depth = depth.checked_sub(1)?;
                        self.i += 1;
                        if depth == 0 {
                            return Some(());
                        }
                    }
                }
            }
            _ => {
                let start = self.i;
                while !matches!(
                    self.b.get(self.i),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')
                ) {
                    self.i += 1;
                }
                (self.i > start).then_some(())
            }
        }
    }
}

/// An encoded inference answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The JSON, followed by the raw tensors when any output is binary.
    pub body: Vec<u8>,
    /// With binary outputs: the length of the JSON part (sent as the
    /// [`HEADER_LENGTH`] header); `None` for a plain JSON body.
    pub json_len: Option<usize>,
}

/// Encodes an answer of `model` (name, version): plain JSON, or JSON
/// followed by raw tensors when any output is returned as binary.
///
/// The body is written as text straight into one buffer: tensor data goes
/// in as shortest-form numbers or, for binary outputs, as bytes appended
/// after the JSON part, with no `serde_json::Value` or per-tensor buffer
/// in between.
pub fn encode_response(
    model: (&str, u64),
    id: Option<&str>,
    outputs: &[(&Tensor, bool)],
) -> Encoded {
    let json_estimate: usize = outputs
        .iter()
        .map(|(t, binary)| 96 + t.name.len() + if *binary { 0 } else { t.data.len() * 12 })
        .sum();
    let binary_len: usize = outputs
        .iter()
        .filter(|(_, binary)| *binary)
        .map(|(t, _)| t.data.len() * t.data.datatype().byte_size())
        .sum();
    let mut body = Vec::with_capacity(128 + json_estimate + binary_len);
    body.push(b'{');
    if let Some(id) = id {
        body.extend_from_slice(b"\"id\":");
        write_json_string(&mut body, id);
        body.push(b',');
    }
    body.extend_from_slice(b"\"model_name\":");
    write_json_string(&mut body, model.0);
    body.extend_from_slice(b",\"model_version\":\"");
    body.extend_from_slice(itoa::Buffer::new().format(model.1).as_bytes());
    body.extend_from_slice(b"\",\"outputs\":[");
    for (i, (t, as_binary)) in outputs.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"name\":");
        write_json_string(&mut body, &t.name);
        body.extend_from_slice(b",\"datatype\":\"");
        body.extend_from_slice(t.data.datatype().as_str().as_bytes());
        body.extend_from_slice(b"\",\"shape\":[");
        for (j, d) in t.shape.iter().enumerate() {
            if j > 0 {
                body.push(b',');
            }
            body.extend_from_slice(itoa::Buffer::new().format(*d).as_bytes());
        }
        body.push(b']');
        if *as_binary {
            let size = t.data.len() * t.data.datatype().byte_size();
            body.extend_from_slice(b",\"parameters\":{\"binary_data_size\":");
            body.extend_from_slice(itoa::Buffer::new().format(size).as_bytes());
            body.push(b'}');
        } else {
            body.extend_from_slice(b",\"data\":");
            t.data.write_json(&mut body);
        }
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    if !outputs.iter().any(|(_, binary)| *binary) {
        return Encoded {
            body,
            json_len: None,
        };
    }
    let json_len = body.len();
    for (t, _) in outputs.iter().filter(|(_, binary)| *binary) {
        t.data.write_le_bytes(&mut body);
    }
    Encoded {
        body,
        json_len: Some(json_len),
    }
}

/// Appends `s` as a JSON string (quoted and escaped).
fn write_json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("a string always serialises into a Vec");
}

/// The bytes of a JSON value.
pub fn to_json_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("a serde_json::Value has string keys and always serialises")
}

/// One tensor as JSON with its data inline (uploaded results).
pub fn tensor_json(t: &Tensor) -> Value {
    json!({
        "name": t.name,
        "datatype": t.data.datatype().as_str(),
        "shape": t.shape,
        "data": t.data.to_json(),
    })
}

fn spec_json(spec: &IoSpec) -> Value {
    json!({"name": spec.name, "datatype": spec.datatype.as_str(), "shape": spec.oip_shape()})
}

/// Model metadata (`GET /v2/models/{m}`).
pub fn metadata(model: &ServedModel) -> Value {
    json!({
        "name": model.name,
        "versions": [model.version.to_string()],
        "platform": format!("{}_{}", model.format, model.engine.runtime()),
        "inputs": model.engine.inputs().iter().map(spec_json).collect::<Vec<_>>(),
        "outputs": model.engine.outputs().iter().map(spec_json).collect::<Vec<_>>(),
        "parameters": {
            "runtime": model.engine.runtime(),
            "sha256": model.sha256,
            "runtime_trials": model.trials.iter().map(crate::engine::Trial::to_json).collect::<Vec<_>>(),
        },
    })
}

/// Triton's statistics extension (`GET /v2/models/{m}/stats`), with the
/// agent's latency percentiles added.
pub fn statistics(model: &ServedModel, batching: &super::batch::Batching) -> Value {
    let mut served = model_statistics(model, batching);
    if let Some(shadow) = model.quality.shadow() {
        let totals = shadow.totals();
        let mut figures = serde_json::to_value(&totals).unwrap_or(Value::Null);
        figures["runtime"] = shadow.runtime().into();
        figures["agreement"] = json!(totals.agreement());
        served["shadow"] = figures;
    }
    let Some(split) = model.quality.split() else {
        return json!({"model_stats": [served]});
    };
    // An A/B split: one entry per variant, each with its own figures.
    served["variant"] = "a".into();
    let mut variant = model_statistics(split.variant(), batching);
    variant["variant"] = "b".into();
    variant["share"] = json!(split.spec().share);
    variant["experiment"] = json!(split.spec().experiment);
    json!({"model_stats": [served, variant]})
}

fn model_statistics(model: &ServedModel, batching: &super::batch::Batching) -> Value {
    let s = model.stats.snapshot();
    json!({
        "name": model.name,
        "version": model.version.to_string(),
        "inference_count": s.successes,
        "execution_count": s.successes,
        "inference_stats": {
            "success": {"count": s.successes, "ns": s.success_nanos},
            "fail": {"count": s.failures, "ns": 0},
        },
        "latency_us": {"p50": s.p50_us, "p90": s.p90_us, "p99": s.p99_us},
        "runtime": model.engine.runtime(),
        "batches": batching.stats_json(model),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary_body(json: &Value, tensors: &[&[u8]]) -> (usize, Vec<u8>) {
        let mut body = serde_json::to_vec(json).unwrap();
        let len = body.len();
        for t in tensors {
            body.extend_from_slice(t);
        }
        (len, body)
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn binary_inputs_are_split_in_order_and_mixed_with_json() {
        let a = f32_bytes(&[1.0, 2.0]);
        let b = [7u8, 8, 9];
        let json = json!({"inputs": [
            {"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
            {"name": "j", "shape": [1], "datatype": "INT64", "data": [5]},
            {"name": "b", "shape": [3], "datatype": "UINT8", "parameters": {"binary_data_size": 3}}
        ], "outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}]});
        let (len, body) = binary_body(&json, &[&a, &b]);
        let d = decode_request(Some(len), &body).unwrap();
        assert_eq!(d.inputs[0].data, TensorData::Fp32(vec![1.0, 2.0]));
        assert_eq!(d.inputs[1].data, TensorData::Int64(vec![5]));
        assert_eq!(d.inputs[2].data, TensorData::Uint8(vec![7, 8, 9]));
        assert_eq!(
            d.wanted.unwrap(),
            vec![("y".to_string(), true), ("z".to_string(), false)]
        );
    }

    #[test]
    fn truncated_or_padded_binary_bodies_are_refused_with_a_reason() {
        let json = json!({"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]});
        let (len, body) = binary_body(&json, &[&[0u8; 5]]);
        let err = decode_request(Some(len), &body).unwrap_err().to_string();
        assert!(err.contains("only 5 binary bytes remain"), "{err}");
        let (len, body) = binary_body(&json, &[&[0u8; 12]]);
        let err = decode_request(Some(len), &body).unwrap_err().to_string();
        assert!(err.contains("4 bytes of binary data"), "{err}");
        let err = decode_request(Some(body.len() + 1), &body)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Inference-Header-Content-Length"), "{err}");
        let json = json!({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}, "data": [1]}]});
        let (len, body) = binary_body(&json, &[&[0u8; 4]]);
        assert!(decode_request(Some(len), &body)
            .unwrap_err()
            .to_string()
            .contains("both"));
        let json = json!({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]});
        let (len, body) = binary_body(&json, &[]);
        assert!(decode_request(Some(len), &body)
            .unwrap_err()
            .to_string()
            .contains("neither"));
    }

    #[test]
    fn request_level_binary_output_applies_to_every_output() {
        let json = json!({"inputs": [], "parameters": {"binary_data_output": true}});
        let d = decode_request(None, &serde_json::to_vec(&json).unwrap()).unwrap();
        assert!(d.binary_by_default && d.wanted.is_none());
    }

    #[test]
    fn the_client_key_parameter_is_read_as_text() {
        for (key, expected) in [
            (json!("shop-7"), Some("shop-7")),
            (json!(42), Some("42")),
            (json!([1]), None),
        ] {
            let json = json!({"inputs": [], "parameters": {"client_key": key}});
            let d = decode_request(None, &serde_json::to_vec(&json).unwrap()).unwrap();
            assert_eq!(d.client_key.as_deref(), expected);
        }
        let d = decode_request(None, br#"{"inputs": []}"#).unwrap();
        assert_eq!(d.client_key, None);
    }

    #[test]
    fn an_unknown_datatype_names_the_input() {
        let json =
            json!({"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP128", "data": [1]}]});
        let err = decode_request(None, &serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert!(
            matches!(&err, RequestError::BadInput { input, .. } if input == "pixels"),
            "{err:?}"
        );
    }

    #[test]
    fn binary_outputs_follow_the_json_part_whose_length_is_given() {
        let y = Tensor {
            name: "y".into(),
            shape: vec![2],
            data: TensorData::Fp32(vec![1.5, -2.0]),
        };
        let z = Tensor {
            name: "z".into(),
            shape: vec![1],
            data: TensorData::Int64(vec![7]),
        };
        let encoded = encode_response(("m", 3), Some("r1"), &[(&y, true), (&z, false)]);
        let json_len = encoded
            .json_len
            .expect("a binary output makes a split body");
        let (head, tail) = encoded.body.split_at(json_len);
        assert_eq!(tail, f32_bytes(&[1.5, -2.0]).as_slice());
        let head: Value = serde_json::from_slice(head).unwrap();
        assert_eq!(head["id"], "r1");
        assert_eq!(head["model_version"], "3");
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(head["outputs"][1]["data"], json!([7]));

        let plain = encode_response(("m", 3), None, &[(&z, false)]);
        assert_eq!(plain.json_len, None);
        let body: Value = serde_json::from_slice(&plain.body).unwrap();
        assert!(body.get("id").is_none());
    }

    /// The text written directly is the JSON the protocol describes, with
    /// names escaped and floats in their shortest form.
    #[test]
    fn json_answers_are_written_as_the_protocol_describes() {
        let t = Tensor {
            name: "prob\"s\n".into(),
            shape: vec![1, 3],
            data: TensorData::Fp32(vec![0.1, 1.0 / 3.0, f32::NAN]),
        };
        let encoded = encode_response(("m\\1", 12), Some("id\u{1}"), &[(&t, false)]);
        assert_eq!(encoded.json_len, None);
        let body: Value = serde_json::from_slice(&encoded.body).unwrap();
        assert_eq!(
            body,
            json!({"id": "id\u{1}", "model_name": "m\\1", "model_version": "12", "outputs": [
                {"name": "prob\"s\n", "datatype": "FP32", "shape": [1, 3], "data": [0.1, 0.33333334, null]}
            ]})
        );
        assert!(String::from_utf8(encoded.body)
            .unwrap()
            .contains("[0.1,0.33333334,null]"));
    }

    #[test]
    fn json_data_is_decoded_with_the_input_named_in_errors() {
        let body = br#"{"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "data": [0.5, 16777217]},
            {"name": "b", "shape": [2, 2], "datatype": "INT8", "data": [[1, 2], [3, 300]]}]}"#;
        let err = decode_request(None, body).unwrap_err().to_string();
        assert_eq!(
            err,
            "element 3 of input \"b\" (300) is out of range for INT8"
        );
        let body = br#"{"id": "q", "inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "data": [0.5, 16777217]}]}"#;
        let d = decode_request(None, body).unwrap();
        assert_eq!(d.id.as_deref(), Some("q"));
        assert_eq!(d.inputs[0].data, TensorData::Fp32(vec![0.5, 16_777_216.0]));
    }

    #[test]
    fn data_arrays_are_cut_out_and_everything_else_left_to_serde() {
        let json = br#" {"id": "a[\"]", "inputs": [
            {"name": "x", "data": [[1, 2], [3, 4]], "shape": [2, 2], "datatype": "FP32"},
            {"name": "s", "shape": [], "datatype": "INT64", "data": 5},
            {"data" : [ ], "name": "e", "shape": [0], "datatype": "FP32", "parameters": {"k": [{"]": "}"}]}}
        ], "outputs": [{"name": "y"}]} "#;
        let cut = cut_data_arrays(json).unwrap();
        assert_eq!(
            cut.arrays,
            vec![Some("[[1, 2], [3, 4]]"), None, Some("[ ]")]
        );
        let rest: Value = serde_json::from_slice(&cut.rest).unwrap();
        assert_eq!(rest["inputs"][0]["data"], json!([]));
        assert_eq!(rest["inputs"][1]["data"], json!(5));
        assert_eq!(rest["id"], "a[\"]");
        let d = decode_request(None, json).unwrap();
        assert_eq!(d.inputs[0].data, TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0]));
        assert_eq!(d.inputs[1].data, TensorData::Int64(vec![5]));
        assert_eq!(d.inputs[2].data, TensorData::Fp32(vec![]));

        // Not laid out as a request, or malformed: left whole to serde_json.
        for json in [
            &b"[1]"[..],
            b"{\"inputs\": {}}",
            b"{\"inputs\": [{\"data\": [1, 2}]}",
            b"{\"inputs\": [{\"data\": [1]}]} x",
            b"{\"inputs\": [{\"data\": \"[1]",
        ] {
            assert!(
                cut_data_arrays(json).is_none(),
                "{}",
                String::from_utf8_lossy(json)
            );
        }
    }

    #[test]
    fn malformed_requests_are_described_as_sent() {
        // The shape error is serde_json's, on the request as sent (its
        // column, 57, counts the data array).
        let json =
            br#"{"inputs": [{"name": "x", "data": [1, 2, 3], "shape": "2", "datatype": "FP32"}]}"#;
        let err = decode_request(None, json).unwrap_err().to_string();
        assert!(
            err.starts_with("malformed inference request JSON: invalid type"),
            "{err}"
        );
        assert!(err.contains("column 57"), "{err}");
        // Malformed inside a data array: the typed decoder names the element.
        let json =
            br#"{"inputs": [{"name": "x", "data": [1, 2, 3e], "shape": [3], "datatype": "FP32"}]}"#;
        let err = decode_request(None, json).unwrap_err().to_string();
        assert!(
            err.starts_with("element 2 of input \"x\" is invalid JSON"),
            "{err}"
        );
    }
}
