//! Device credentials and keys: enroll a device (its MQTT password and
//! bundle), revoke it, set or register the key its messages are signed
//! with, and the password and ACL files an external Mosquitto needs.

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::{Extension, Json};
use edgefleet_shared::DeviceId;
use serde::{Deserialize, Serialize};

use super::access::{audit, detail};
use super::devices::{check_hardware, check_tag};
use super::types::{
    EnrollRequest, EnrolledDevice, ErrorBody, MosquittoFiles, MqttCredentials, RegisterKeyRequest,
    RegisteredKey, SetKeyRequest,
};
use super::{parse_body, ApiError, ApiResult};
use crate::auth;
use crate::fleet::Fleet;
use crate::store::{self, DeviceRecord};

/// Parses a public key given in a request.
fn parse_public_key(text: &str) -> ApiResult<edgefleet_shared::PublicKey> {
    text.parse()
        .map_err(|e: edgefleet_shared::crypto::KeyError| ApiError::BadRequest(e.to_string()))
}

/// What the audit log keeps about an enrollment.
#[derive(Serialize)]
struct EnrollDetail<'a> {
    hardware: &'a str,
    tags: &'a std::collections::BTreeMap<String, String>,
    public_key: &'a Option<String>,
}

/// `POST /api/v1/devices` (admin): enrolls a device (again: a new
/// password) and answers with what its bundle needs. The password is in
/// this answer only; the server keeps its hash.
#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", request_body = EnrollRequest, responses((status = 201, description = "the device, its MQTT credentials (the password only here) and the root document: a device bundle", body = EnrolledDevice), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody)))]
pub(super) async fn enroll_device(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<EnrolledDevice>)> {
    let req: EnrollRequest = parse_body(
        &body,
        "malformed enrollment (expected {\"id\", \"hardware\", \"tags\": {}})",
    )?;
    let id = DeviceId::new(req.id.clone()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    check_hardware(&req.hardware)?;
    for (k, v) in &req.tags {
        check_tag(k, v)?;
    }
    let public_key = req
        .public_key
        .as_deref()
        .map(parse_public_key)
        .transpose()?;
    let password = auth::device_password();
    let enrollment = store::Enrollment {
        id: id.to_string(),
        hardware: req.hardware.clone(),
        tags: req.tags.clone(),
        credential: auth::mosquitto_hash(&password),
        public_key: public_key.map(|k| k.to_hex()),
    };
    let device = fleet
        .store
        .enroll_device(&enrollment, edgefleet_shared::unix_now())
        .await?;
    fleet.device_keys.learn(&device);
    fleet.set_revoked(id.as_str(), false);
    fleet.rollouts.on_join(&device).await;
    fleet.rollouts.flush().await?;
    audit(
        &fleet,
        &op,
        "device.enroll",
        id.to_string(),
        detail(EnrollDetail {
            hardware: &req.hardware,
            tags: &req.tags,
            public_key: &device.public_key,
        }),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(EnrolledDevice {
            device,
            mqtt: MqttCredentials {
                url: fleet.device_mqtt_url.clone(),
                topic_prefix: fleet.prefix.as_str().to_string(),
                username: id.to_string(),
                password,
                ca_pem: fleet.device_ca_pem.clone(),
            },
            server_url: fleet.public_url.clone(),
            root: fleet.signer.root_envelope().into(),
        }),
    ))
}

/// What the audit log keeps about a revocation.
#[derive(Serialize)]
struct RevokeDetail {
    connections_closed: usize,
}

/// `POST /api/v1/devices/{id}/revoke` (admin): its credentials stop
/// working (the embedded broker with device authentication refuses it;
/// regenerate an external broker's password file).
#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", tag = "devices", params(("id" = String, Path, description = "device id")), responses((status = 200, body = DeviceRecord), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn revoke_device(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeviceRecord>> {
    let device = fleet
        .store
        .revoke_device(&id, edgefleet_shared::unix_now())
        .await?
        .ok_or_else(|| ApiError::UnknownDevice(id.clone()))?;
    fleet.set_revoked(&id, true);
    // Cut it off now rather than at its next connect.
    let cut = fleet.broker.as_ref().map_or(0, |b| b.evict(&id));
    crate::bridge::kick(&fleet, &id);
    audit(
        &fleet,
        &op,
        "device.revoke",
        id,
        detail(RevokeDetail {
            connections_closed: cut,
        }),
    )
    .await;
    Ok(Json(device))
}

/// What the audit log keeps about a key set by an operator.
#[derive(Serialize)]
struct KeyDetail {
    public_key: String,
}

/// `PUT /api/v1/devices/{id}/key` (admin): sets the key the device's
/// messages must be signed with, replacing any earlier one (a key the
/// device made and logged at start, or a rotation).
#[utoipa::path(put, path = "/api/v1/devices/{id}/key", tag = "devices", params(("id" = String, Path, description = "device id")), request_body = SetKeyRequest, responses((status = 200, body = DeviceRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn set_device_key(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<DeviceRecord>> {
    let req: SetKeyRequest = parse_body(
        &body,
        "malformed key (expected {\"public_key\": \"<64 hex>\"})",
    )?;
    let key = parse_public_key(&req.public_key)?;
    fleet
        .store
        .set_device_key(&id, &key.to_hex(), store::KeyWrite::Operator)
        .await?
        .ok_or_else(|| ApiError::UnknownDevice(id.clone()))?;
    let device = fleet
        .store
        .get_device(&id)
        .await?
        .ok_or_else(|| ApiError::UnknownDevice(id.clone()))?;
    fleet.device_keys.learn(&device);
    audit(
        &fleet,
        &op,
        "device.set_key",
        id,
        detail(KeyDetail {
            public_key: key.to_hex(),
        }),
    )
    .await;
    Ok(Json(device))
}

/// `POST /api/v1/device-key`: a device registers the key it made, with
/// its enrollment credentials (HTTP Basic: device id and MQTT password)
/// and proof that it holds the key. Taken only while the device has no
/// key; the same key again is fine; a different one is refused (409)
/// until an operator sets it.
#[utoipa::path(post, path = "/api/v1/device-key", tag = "devices", security(()), request_body = RegisterKeyRequest, responses((status = 200, description = "the key is the device's", body = RegisteredKey), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "not an enrolled, unrevoked device with these credentials", body = ErrorBody), (status = 409, description = "the device has another key", body = ErrorBody)))]
pub(super) async fn register_device_key(
    State(fleet): State<Fleet>,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<RegisteredKey>> {
    let unauthorized = || {
        ApiError::Unauthorized(
            "not an enrolled, unrevoked device with these credentials (HTTP Basic: device id and its MQTT password)".into(),
        )
    };
    let (user, password) = basic_credentials(&headers).ok_or_else(unauthorized)?;
    let req: RegisterKeyRequest = parse_body(
        &body,
        "malformed registration (expected device_id, public_key, proof)",
    )?;
    if req.device_id != user {
        return Err(unauthorized());
    }
    let hash = fleet
        .store
        .device_credential(&user)
        .await?
        .ok_or_else(unauthorized)?;
    if !auth::verify_mosquitto(&password, &hash) {
        return Err(unauthorized());
    }
    let key = parse_public_key(&req.public_key)?;
    let proof = edgefleet_shared::crypto::decode_signature(&req.proof)
        .map_err(|e| ApiError::BadRequest(format!("proof: {e}")))?;
    let input = edgefleet_shared::signed_message::key_registration_input(&user, &key.to_hex());
    if !key.verify(&input, &proof) {
        return Err(ApiError::BadRequest(
            "proof does not verify: sign the registration with the key being registered".into(),
        ));
    }
    let held = fleet
        .store
        .set_device_key(&user, &key.to_hex(), store::KeyWrite::FirstOnly)
        .await?;
    if held.as_deref() != Some(key.to_hex().as_str()) {
        return Err(ApiError::Conflict(format!(
            "device {user:?} has another key registered; an operator changes it with `fleetctl devices set-key`"
        )));
    }
    if let Some(device) = fleet.store.get_device(&user).await? {
        fleet.device_keys.learn(&device);
    }
    tracing::info!(device = %user, key = %key.key_id().short(), "device registered its key");
    Ok(Json(RegisteredKey {
        device_id: user,
        public_key: key.to_hex(),
    }))
}

/// The user name and password of an HTTP Basic `Authorization` header.
fn basic_credentials(headers: &http::HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// The query of the Mosquitto files.
#[derive(Deserialize)]
pub(super) struct MosquittoQuery {
    server_user: Option<String>,
}

/// `GET /api/v1/broker/mosquitto?server_user=U` (admin): a Mosquitto
/// `password_file` (enrolled, unrevoked devices; hashes as stored) and an
/// `acl_file` letting each device publish and subscribe only under its own
/// id, and the server user everywhere under the topic prefix.
#[utoipa::path(get, path = "/api/v1/broker/mosquitto", tag = "devices", params(("server_user" = Option<String>, Query)), responses((status = 200, description = "password_file, acl_file, server_user", body = MosquittoFiles), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody)))]
pub(super) async fn mosquitto_files(
    State(fleet): State<Fleet>,
    Query(q): Query<MosquittoQuery>,
) -> ApiResult<Json<MosquittoFiles>> {
    let mut password_file = String::new();
    for device in fleet.store.find_all_devices(&Default::default()).await? {
        if let Some(hash) = fleet.store.device_credential(&device.id).await? {
            password_file += &format!("{}:{hash}\n", device.id);
        }
    }
    let server_user = q
        .server_user
        .unwrap_or_else(|| crate::bridge::client_id(&fleet.prefix));
    let acl_file = auth::mosquitto_acl(fleet.prefix.as_str(), &server_user);
    Ok(Json(MosquittoFiles {
        password_file,
        acl_file,
        server_user,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_authorization(value: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn basic_credentials_are_read_from_the_header() {
        // "cam-1:s3cr:et" in base64: the password may hold a colon.
        let headers = with_authorization("Basic Y2FtLTE6czNjcjpldA==");
        assert_eq!(
            basic_credentials(&headers),
            Some(("cam-1".to_string(), "s3cr:et".to_string()))
        );
        assert_eq!(basic_credentials(&with_authorization("Bearer x")), None);
        assert_eq!(basic_credentials(&with_authorization("Basic !!")), None);
        assert_eq!(basic_credentials(&http::HeaderMap::new()), None);
    }

    #[test]
    fn public_keys_must_be_64_hex() {
        let key = edgefleet_shared::SecretKey::from_seed([7; 32]).public();
        assert_eq!(parse_public_key(&key.to_hex()).unwrap(), key);
        assert!(matches!(
            parse_public_key("abc"),
            Err(ApiError::BadRequest(_))
        ));
    }
}
