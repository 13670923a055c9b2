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
}

#[derive(Deserialize)]
struct InferRequest {
    id: Option<String>,
    #[serde(default)]
    parameters: Option<RequestParameters>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize, Default)]
struct InputParameters {
    binary_data_size: Option<usize>,
}

#[derive(Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<usize>,
    datatype: String,
    #[serde(default)]
    parameters: Option<InputParameters>,
    /// Kept as text and decoded once the datatype is known, straight into
    /// typed elements (no JSON tree for large tensors).
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
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
    let request: InferRequest = serde_json::from_slice(json_part).map_err(RequestError::Json)?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let bad = |reason: String| RequestError::BadInput {
            input: input.name.clone(),
            reason,
        };
        let datatype: DataType = input.datatype.parse().map_err(bad)?;
        let binary_size = input.parameters.and_then(|p| p.binary_data_size);
        let data = match (binary_size, &input.data) {
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
            (None, Some(data)) => TensorData::from_json_text(&input.name, datatype, data.get())?,
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
    let binary_by_default = request
        .parameters
        .and_then(|p| p.binary_data_output)
        .unwrap_or(false);
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
    })
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
pub fn encode_response(
    model: (&str, u64),
    id: Option<String>,
    outputs: Vec<(Tensor, bool)>,
) -> Encoded {
    let mut binary = Vec::new();
    let outputs: Vec<Value> = outputs
        .into_iter()
        .map(|(t, as_binary)| {
            let mut out = json!({
                "name": t.name,
                "datatype": t.data.datatype().as_str(),
                "shape": t.shape,
            });
            if as_binary {
                let bytes = t.data.to_le_bytes();
                out["parameters"] = json!({"binary_data_size": bytes.len()});
                binary.extend_from_slice(&bytes);
            } else {
                out["data"] = t.data.to_json();
            }
            out
        })
        .collect();
    let mut body = json!({
        "model_name": model.0,
        "model_version": model.1.to_string(),
        "outputs": outputs,
    });
    if let Some(id) = id {
        body["id"] = Value::String(id);
    }
    let mut bytes = to_json_bytes(&body);
    if binary.is_empty() {
        return Encoded {
            body: bytes,
            json_len: None,
        };
    }
    let json_len = bytes.len();
    bytes.extend_from_slice(&binary);
    Encoded {
        body: bytes,
        json_len: Some(json_len),
    }
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
pub fn statistics(model: &ServedModel) -> Value {
    let s = model.stats.snapshot();
    json!({"model_stats": [{
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
    }]})
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
        let outputs = vec![
            (
                Tensor {
                    name: "y".into(),
                    shape: vec![2],
                    data: TensorData::Fp32(vec![1.5, -2.0]),
                },
                true,
            ),
            (
                Tensor {
                    name: "z".into(),
                    shape: vec![1],
                    data: TensorData::Int64(vec![7]),
                },
                false,
            ),
        ];
        let encoded = encode_response(("m", 3), Some("r1".into()), outputs);
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

        let plain = encode_response(
            ("m", 3),
            None,
            vec![(
                Tensor {
                    name: "z".into(),
                    shape: vec![1],
                    data: TensorData::Int64(vec![7]),
                },
                false,
            )],
        );
        assert_eq!(plain.json_len, None);
        let body: Value = serde_json::from_slice(&plain.body).unwrap();
        assert!(body.get("id").is_none());
    }
}
