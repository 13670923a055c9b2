//! A typed client of the fleet server's HTTP API (`/api/v1`): one method
//! per endpoint fleetctl calls, request and answer bodies as
//! [`fleet_server::api::types`], every URL built by [`url::ApiUrl`] with
//! its path segments and query parameters percent-encoded, and every
//! refusal turned into a [`ClientError`] carrying the server's status and
//! message. The command modules print what it returns; nothing here
//! prints.

pub mod url;

pub use url::{encode_segment, ApiUrl, Attachment, DeviceQuery, RolloutAction, StreamQuery};

use std::path::{Path, PathBuf};

use fleet_server::api::types::{
    AgentBuildRecord, AgentDeployRequest, AgentDeployment, AgentRelease, AuditRecord,
    CreateRollout, CreatedToken, DeployRequest, Deployment, DeviceDetail, DeviceResults,
    DeviceTelemetry, EnrollRequest, EnrolledDevice, ErrorBody, EventRecord, ModelRecord,
    MosquittoFiles, NewTokenRequest, RolloutStatus, SetKeyRequest, Tags, Token,
};
use fleet_server::auth::Scope;
use fleet_server::store::DeviceRecord;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a call to the fleet server did not give the answer asked for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The token cannot be sent in an `Authorization` header (a control
    /// character, say). The token itself is left out: it is a secret.
    #[error("the operator token has characters a header cannot carry")]
    TokenNotAHeader,
    #[error("cannot read {}", path.display())]
    CaCertUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a PEM certificate", path.display())]
    CaCertInvalid {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot set up the HTTP client")]
    Setup(#[source] reqwest::Error),
    /// No connection (nothing listening, no route, a timeout).
    #[error("cannot reach the fleet server at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// Connected, but the exchange broke off.
    #[error("request to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server refused or failed the call: its status and its
    /// `{"error": ...}` message (or the body, when it sent no such JSON).
    #[error("server answered {status}: {message}")]
    Api { status: StatusCode, message: String },
    /// A success whose body is not what the endpoint answers.
    #[error("unexpected answer from the server to {url}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// An answer: the typed body, and the JSON exactly as the server sent it
/// (what `--json` prints, so fields this client does not read still
/// reach scripts unchanged).
#[derive(Debug, Clone)]
pub struct Answer<T> {
    pub body: T,
    pub raw: Value,
}

/// A connection to one fleet server that sends the operator token with
/// every call.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    api: ApiUrl,
}

impl Client {
    /// A client of the server at `server` (`http(s)://host:port`), sending
    /// `token` (if any, and not blank) as a bearer token and trusting the
    /// PEM CA certificate at `ca_cert` besides the system's roots.
    pub fn new(
        server: &str,
        token: Option<&str>,
        ca_cert: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ClientError::TokenNotAHeader)?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder().default_headers(headers);
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path).map_err(|source| ClientError::CaCertUnreadable {
                path: path.to_path_buf(),
                source,
            })?;
            let ca = reqwest::Certificate::from_pem(&pem).map_err(|source| {
                ClientError::CaCertInvalid {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            builder = builder.add_root_certificate(ca);
        }
        // reqwest's rustls needs a process-wide crypto provider.
        fleet_server::install_crypto_provider();
        Ok(Self {
            http: builder.build().map_err(ClientError::Setup)?,
            api: ApiUrl::new(server),
        })
    }

    /// The URL of an API path (see [`ApiUrl::url`]).
    pub fn url(&self, segments: &[&str], query: &[(&str, String)]) -> String {
        self.api.url(segments, query)
    }

    /// Sends a request and reads its answer as `T`.
    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<Answer<T>, ClientError> {
        let fail = |source: reqwest::Error| {
            let source = source.without_url();
            if source.is_connect() || source.is_timeout() {
                ClientError::Unreachable {
                    url: url.to_string(),
                    source,
                }
            } else {
                ClientError::Transport {
                    url: url.to_string(),
                    source,
                }
            }
        };
        let response = request.send().await.map_err(fail)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(fail)?;
        if !status.is_success() {
            return Err(ClientError::Api {
                status,
                message: error_message(status, &bytes),
            });
        }
        let decode = |source| ClientError::Decode {
            url: url.to_string(),
            source,
        };
        let raw: Value = serde_json::from_slice(&bytes).map_err(decode)?;
        let body = T::deserialize(&raw).map_err(decode)?;
        Ok(Answer { body, raw })
    }

    /// A call with no request body.
    async fn simple<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Answer<T>, ClientError> {
        let url = self.url(segments, query);
        self.call(self.http.request(method, &url), &url).await
    }

    /// A call with a JSON request body.
    async fn with_json<T: DeserializeOwned, B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        segments: &[&str],
        body: &B,
    ) -> Result<Answer<T>, ClientError> {
        let url = self.url(segments, &[]);
        self.call(self.http.request(method, &url).json(body), &url)
            .await
    }

    /// `GET /api/v1/models`: every model version.
    pub async fn list_models(&self) -> Result<Answer<Vec<ModelRecord>>, ClientError> {
        self.simple(Method::GET, &["api", "v1", "models"], &[])
            .await
    }

    /// `POST /api/v1/models/{name}/versions/{version}`: uploads a model
    /// file of `size` bytes, streamed from `body`.
    pub async fn push_model(
        &self,
        name: &str,
        version: u64,
        format: &str,
        notes: Option<&str>,
        body: reqwest::Body,
        size: u64,
    ) -> Result<Answer<ModelRecord>, ClientError> {
        let mut query = vec![("format", format.to_string())];
        if let Some(notes) = notes {
            query.push(("notes", notes.to_string()));
        }
        let version = version.to_string();
        let url = self.url(&["api", "v1", "models", name, "versions", &version], &query);
        let request = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(body);
        self.call(request, &url).await
    }

    /// `PUT /api/v1/models/{name}/versions/{version}/{attachment}`: stores
    /// a test vector or spec (JSON, sent as read so the server judges it).
    pub async fn put_attachment(
        &self,
        name: &str,
        version: u64,
        attachment: Attachment,
        json: Vec<u8>,
    ) -> Result<Answer<ModelRecord>, ClientError> {
        let version = version.to_string();
        let url = self.url(
            &[
                "api",
                "v1",
                "models",
                name,
                "versions",
                &version,
                attachment.segment(),
            ],
            &[],
        );
        let request = self
            .http
            .put(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json);
        self.call(request, &url).await
    }

    /// `DELETE /api/v1/models/{name}/versions/{version}`.
    pub async fn delete_model(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Answer<ModelRecord>, ClientError> {
        let version = version.to_string();
        self.simple(
            Method::DELETE,
            &["api", "v1", "models", name, "versions", &version],
            &[],
        )
        .await
    }

    /// `POST /api/v1/deployments`.
    pub async fn deploy(&self, request: &DeployRequest) -> Result<Answer<Deployment>, ClientError> {
        self.with_json(Method::POST, &["api", "v1", "deployments"], request)
            .await
    }

    /// `PUT /api/v1/agent/releases/{version}/{target}`: uploads the
    /// executable of one build of an agent release, `size` bytes streamed
    /// from `body`.
    pub async fn push_agent_build(
        &self,
        version: &str,
        target: &str,
        notes: Option<&str>,
        body: reqwest::Body,
        size: u64,
    ) -> Result<Answer<AgentBuildRecord>, ClientError> {
        let query: Vec<(&str, String)> = notes
            .map(|n| ("notes", n.to_string()))
            .into_iter()
            .collect();
        let url = self.url(&["api", "v1", "agent", "releases", version, target], &query);
        let request = self
            .http
            .put(&url)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.call(request, &url).await
    }

    /// `GET /api/v1/agent/releases`: every agent release with its builds,
    /// oldest first.
    pub async fn list_agent_releases(&self) -> Result<Answer<Vec<AgentRelease>>, ClientError> {
        self.simple(Method::GET, &["api", "v1", "agent", "releases"], &[])
            .await
    }

    /// `GET /api/v1/agent/releases/{version}`.
    pub async fn get_agent_release(
        &self,
        version: &str,
    ) -> Result<Answer<AgentRelease>, ClientError> {
        self.simple(
            Method::GET,
            &["api", "v1", "agent", "releases", version],
            &[],
        )
        .await
    }

    /// `DELETE /api/v1/agent/releases/{version}`.
    pub async fn delete_agent_release(
        &self,
        version: &str,
    ) -> Result<Answer<AgentRelease>, ClientError> {
        self.simple(
            Method::DELETE,
            &["api", "v1", "agent", "releases", version],
            &[],
        )
        .await
    }

    /// `POST /api/v1/agent/deployments`.
    pub async fn deploy_agent(
        &self,
        request: &AgentDeployRequest,
    ) -> Result<Answer<AgentDeployment>, ClientError> {
        self.with_json(
            Method::POST,
            &["api", "v1", "agent", "deployments"],
            request,
        )
        .await
    }

    /// `GET /api/v1/devices`: one page of the devices `query` selects.
    pub async fn list_devices(
        &self,
        query: &DeviceQuery,
    ) -> Result<Answer<Vec<DeviceRecord>>, ClientError> {
        self.simple(Method::GET, &["api", "v1", "devices"], &query.pairs())
            .await
    }

    /// `POST /api/v1/devices`: enrolls a device; the answer holds its
    /// MQTT password, which the server does not keep.
    pub async fn enroll_device(
        &self,
        request: &EnrollRequest,
    ) -> Result<Answer<EnrolledDevice>, ClientError> {
        self.with_json(Method::POST, &["api", "v1", "devices"], request)
            .await
    }

    /// `GET /api/v1/devices/{id}`.
    pub async fn get_device(&self, id: &str) -> Result<Answer<DeviceDetail>, ClientError> {
        self.simple(Method::GET, &["api", "v1", "devices", id], &[])
            .await
    }

    /// `POST /api/v1/devices/{id}/revoke`.
    pub async fn revoke_device(&self, id: &str) -> Result<Answer<DeviceRecord>, ClientError> {
        self.simple(Method::POST, &["api", "v1", "devices", id, "revoke"], &[])
            .await
    }

    /// `PUT /api/v1/devices/{id}/key`.
    pub async fn set_device_key(
        &self,
        id: &str,
        public_key: &str,
    ) -> Result<Answer<DeviceRecord>, ClientError> {
        let body = SetKeyRequest {
            public_key: public_key.to_string(),
        };
        self.with_json(Method::PUT, &["api", "v1", "devices", id, "key"], &body)
            .await
    }

    /// `PUT /api/v1/devices/{id}/tags`: replaces the device's tags.
    pub async fn set_device_tags(
        &self,
        id: &str,
        tags: &Tags,
    ) -> Result<Answer<DeviceRecord>, ClientError> {
        self.with_json(Method::PUT, &["api", "v1", "devices", id, "tags"], tags)
            .await
    }

    /// `GET /api/v1/devices/{id}/events`: the device's latest update
    /// events.
    pub async fn device_events(
        &self,
        id: &str,
        limit: u32,
    ) -> Result<Answer<Vec<EventRecord>>, ClientError> {
        self.simple(
            Method::GET,
            &["api", "v1", "devices", id, "events"],
            &[("limit", limit.to_string())],
        )
        .await
    }

    /// `GET /api/v1/devices/{id}/telemetry`.
    pub async fn device_telemetry(
        &self,
        id: &str,
        query: &StreamQuery,
    ) -> Result<Answer<DeviceTelemetry>, ClientError> {
        self.simple(
            Method::GET,
            &["api", "v1", "devices", id, "telemetry"],
            &query.pairs(),
        )
        .await
    }

    /// `GET /api/v1/devices/{id}/results`.
    pub async fn device_results(
        &self,
        id: &str,
        query: &StreamQuery,
    ) -> Result<Answer<DeviceResults>, ClientError> {
        self.simple(
            Method::GET,
            &["api", "v1", "devices", id, "results"],
            &query.pairs(),
        )
        .await
    }

    /// `GET /api/v1/broker/mosquitto?server_user=U`.
    pub async fn mosquitto_files(
        &self,
        server_user: &str,
    ) -> Result<Answer<MosquittoFiles>, ClientError> {
        self.simple(
            Method::GET,
            &["api", "v1", "broker", "mosquitto"],
            &[("server_user", server_user.to_string())],
        )
        .await
    }

    /// `POST /api/v1/tokens`: the answer holds the token, shown only once.
    pub async fn create_token(
        &self,
        name: &str,
        scope: Scope,
    ) -> Result<Answer<CreatedToken>, ClientError> {
        let body = NewTokenRequest {
            name: name.to_string(),
            scope,
        };
        self.with_json(Method::POST, &["api", "v1", "tokens"], &body)
            .await
    }

    /// `GET /api/v1/tokens`.
    pub async fn list_tokens(&self) -> Result<Answer<Vec<Token>>, ClientError> {
        self.simple(Method::GET, &["api", "v1", "tokens"], &[])
            .await
    }

    /// `DELETE /api/v1/tokens/{id}`.
    pub async fn revoke_token(&self, id: &str) -> Result<Answer<Token>, ClientError> {
        self.simple(Method::DELETE, &["api", "v1", "tokens", id], &[])
            .await
    }

    /// `GET /api/v1/audit`: entries after `after_id`, oldest first.
    pub async fn list_audit(
        &self,
        after_id: u64,
        limit: u32,
    ) -> Result<Answer<Vec<AuditRecord>>, ClientError> {
        self.simple(
            Method::GET,
            &["api", "v1", "audit"],
            &[
                ("after_id", after_id.to_string()),
                ("limit", limit.to_string()),
            ],
        )
        .await
    }

    /// `POST /api/v1/rollouts`: creates a rollout, or with `dry_run` only
    /// plans it.
    pub async fn create_rollout(
        &self,
        request: &CreateRollout,
    ) -> Result<Answer<RolloutStatus>, ClientError> {
        self.with_json(Method::POST, &["api", "v1", "rollouts"], request)
            .await
    }

    /// `GET /api/v1/rollouts`.
    pub async fn list_rollouts(&self) -> Result<Answer<Vec<RolloutStatus>>, ClientError> {
        self.simple(Method::GET, &["api", "v1", "rollouts"], &[])
            .await
    }

    /// `GET /api/v1/rollouts/{id}`; `brief` leaves out each device's state.
    pub async fn get_rollout(
        &self,
        id: &str,
        brief: bool,
    ) -> Result<Answer<RolloutStatus>, ClientError> {
        self.simple(
            Method::GET,
            &["api", "v1", "rollouts", id],
            &[("brief", brief.to_string())],
        )
        .await
    }

    /// `POST /api/v1/rollouts/{id}/{action}`.
    pub async fn rollout_action(
        &self,
        id: &str,
        action: RolloutAction,
    ) -> Result<Answer<RolloutStatus>, ClientError> {
        self.simple(
            Method::POST,
            &["api", "v1", "rollouts", id, action.as_str()],
            &[],
        )
        .await
    }

    /// `POST /api/v1/rollouts/{id}/devices/{device}/{action}` (`exclude`,
    /// `retry` or `force`).
    pub async fn rollout_device_action(
        &self,
        id: &str,
        device: &str,
        action: &str,
    ) -> Result<Answer<RolloutStatus>, ClientError> {
        self.simple(
            Method::POST,
            &["api", "v1", "rollouts", id, "devices", device, action],
            &[],
        )
        .await
    }

    /// `PUT /api/v1/models/{name}/versions/{version}/reference`: sets the
    /// version's drift reference from a reference file (sent as read, so
    /// the server judges it).
    pub async fn put_reference(
        &self,
        name: &str,
        version: u64,
        json: Vec<u8>,
    ) -> Result<Answer<fleet_server::api::types::ReferenceSet>, ClientError> {
        let version = version.to_string();
        let url = self.url(
            &[
                "api",
                "v1",
                "models",
                name,
                "versions",
                &version,
                "reference",
            ],
            &[],
        );
        let request = self
            .http
            .put(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json);
        self.call(request, &url).await
    }

    /// `POST /api/v1/models/{name}/versions/{version}/reference/from-traffic`.
    pub async fn reference_from_traffic(
        &self,
        name: &str,
        version: u64,
        period: &fleet_server::api::types::TrafficPeriod,
    ) -> Result<Answer<fleet_server::api::types::ReferenceSet>, ClientError> {
        let version = version.to_string();
        self.with_json(
            Method::POST,
            &[
                "api",
                "v1",
                "models",
                name,
                "versions",
                &version,
                "reference",
                "from-traffic",
            ],
            period,
        )
        .await
    }

    /// `GET /api/v1/models/{name}/quality`: versions, variants and shadow
    /// candidates side by side.
    pub async fn model_quality(
        &self,
        name: &str,
    ) -> Result<Answer<fleet_server::api::types::ModelQuality>, ClientError> {
        self.simple(Method::GET, &["api", "v1", "models", name, "quality"], &[])
            .await
    }

    /// `PUT` or `DELETE /api/v1/models/{name}/{setting}` (`split` or
    /// `shadow`), or `POST .../split/promote`.
    pub async fn model_setting<T: serde::Serialize>(
        &self,
        method: Method,
        name: &str,
        path: &[&str],
        body: &T,
    ) -> Result<Answer<fleet_server::api::types::QualityChanged>, ClientError> {
        let mut segments = vec!["api", "v1", "models", name];
        segments.extend_from_slice(path);
        self.with_json(method, &segments, body).await
    }

    /// `GET /api/v1/models/{name}/drift`: the model's drift scores.
    pub async fn model_drift(
        &self,
        name: &str,
    ) -> Result<Answer<fleet_server::api::types::ModelDrift>, ClientError> {
        self.simple(Method::GET, &["api", "v1", "models", name, "drift"], &[])
            .await
    }
}

/// The server's explanation of a refusal: the `error` of its JSON body,
/// else the body as text, else the status's reason.
fn error_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(ErrorBody { error }) = serde_json::from_slice(body) {
        return error;
    }
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("no reason given")
            .into()
    } else {
        text
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_prefer_the_servers_error_field() {
        assert_eq!(
            error_message(
                StatusCode::NOT_FOUND,
                br#"{"error":"unknown device \"x\""}"#
            ),
            "unknown device \"x\""
        );
        assert_eq!(
            error_message(StatusCode::BAD_GATEWAY, b"upstream down\n"),
            "upstream down"
        );
        assert_eq!(error_message(StatusCode::BAD_GATEWAY, b""), "Bad Gateway");
    }

    #[test]
    fn clients_use_the_same_urls() {
        let client = Client::new("http://h:1/", Some("eft_a_b"), None).expect("a client builds");
        assert_eq!(
            client.url(&["api", "v1", "tokens", "x y"], &[]),
            "http://h:1/api/v1/tokens/x%20y"
        );
    }

    #[test]
    fn tokens_that_cannot_be_a_header_are_refused() {
        assert!(matches!(
            Client::new("http://h", Some("eft_a\nb"), None),
            Err(ClientError::TokenNotAHeader)
        ));
    }
}
