//! The fleet API's URLs: the base URL, percent-encoded path segments and
//! form-encoded query parameters, built in one place ([`ApiUrl::url`]),
//! and the typed pieces that become segments and queries.

/// A model version's attachment, stored after the model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// Inputs and the outputs devices must reproduce before serving.
    TestVector,
    /// The model's declared inputs and outputs.
    Spec,
}

impl Attachment {
    /// The last path segment of its endpoint.
    pub fn segment(self) -> &'static str {
        match self {
            Self::TestVector => "test-vector",
            Self::Spec => "spec",
        }
    }

    /// What an operator calls it.
    pub fn what(self) -> &'static str {
        match self {
            Self::TestVector => "test vector",
            Self::Spec => "spec",
        }
    }
}

/// Which devices `GET /api/v1/devices` lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceQuery {
    /// KEY=VALUE tags a device must all have.
    pub tags: Vec<String>,
    pub hardware: Option<String>,
    /// Only online (`Some(true)`) or offline devices.
    pub online: Option<bool>,
    /// Only ids after this one (paging).
    pub after: Option<String>,
    pub limit: u32,
}

/// Which records of a device's stream to read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamQuery {
    pub after_seq: Option<u64>,
    pub limit: u32,
    /// Results only: one model's.
    pub model: Option<String>,
}

/// A rollout action (`POST /api/v1/rollouts/{id}/{action}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    Start,
    Pause,
    Resume,
    Approve,
    Abort,
}

impl RolloutAction {
    /// Its path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Approve => "approve",
            Self::Abort => "abort",
        }
    }
}

/// Where a fleet server's API is: builds every URL the client calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUrl {
    /// The server's base URL, without a trailing slash.
    base: String,
}

impl ApiUrl {
    /// The API of the server at `server` (`http(s)://host:port`, a
    /// trailing slash or not).
    pub fn new(server: &str) -> Self {
        Self {
            base: server.trim_end_matches('/').to_string(),
        }
    }

    /// The URL of an API path: the base URL, then each segment
    /// percent-encoded (so an id cannot add a segment or a query), then
    /// the query pairs form-encoded, in order (a key may repeat).
    pub fn url(&self, segments: &[&str], query: &[(&str, String)]) -> String {
        let mut url = self.base.clone();
        for segment in segments {
            url.push('/');
            url.push_str(&encode_segment(segment));
        }
        if !query.is_empty() {
            let mut pairs = form_urlencoded::Serializer::new(String::new());
            for (key, value) in query {
                pairs.append_pair(key, value);
            }
            url.push('?');
            url.push_str(&pairs.finish());
        }
        url
    }
}

impl DeviceQuery {
    /// Its query pairs, in the order the server documents them.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let query = self;
        let mut pairs: Vec<(&str, String)> =
            query.tags.iter().map(|t| ("tag", t.clone())).collect();
        if let Some(hardware) = &query.hardware {
            pairs.push(("hardware", hardware.clone()));
        }
        if let Some(online) = query.online {
            pairs.push(("online", online.to_string()));
        }
        if let Some(after) = &query.after {
            pairs.push(("after", after.clone()));
        }
        pairs.push(("limit", query.limit.to_string()));
        pairs
    }
}

impl StreamQuery {
    /// Its query pairs.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let query = self;
        let mut pairs = vec![("limit", query.limit.to_string())];
        if let Some(after) = query.after_seq {
            pairs.push(("after_seq", after.to_string()));
        }
        if let Some(model) = &query.model {
            pairs.push(("model", model.clone()));
        }
        pairs
    }
}

/// One path segment, percent-encoded: everything but RFC 3986's
/// unreserved characters, so `/`, `?`, `#` and `%` in an id stay inside
/// its segment.
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_keep_unreserved_characters_and_encode_the_rest() {
        assert_eq!(encode_segment("jetson-lyon_2.a~b"), "jetson-lyon_2.a~b");
        assert_eq!(encode_segment("a/b"), "a%2Fb");
        assert_eq!(encode_segment("a b?c#d%e"), "a%20b%3Fc%23d%25e");
        assert_eq!(encode_segment("é"), "%C3%A9");
        assert_eq!(encode_segment(".."), "..");
    }

    #[test]
    fn urls_join_the_base_encoded_segments_and_the_query() {
        let c = ApiUrl::new("http://fleet.example:8080/");
        assert_eq!(
            c.url(&["api", "v1", "devices", "a/b"], &[]),
            "http://fleet.example:8080/api/v1/devices/a%2Fb"
        );
        assert_eq!(
            c.url(
                &["api", "v1", "models", "digits", "versions", "2"],
                &[("format", "onnx".into()), ("notes", "a&b=c d".into())]
            ),
            "http://fleet.example:8080/api/v1/models/digits/versions/2?format=onnx&notes=a%26b%3Dc+d"
        );
    }

    #[test]
    fn device_queries_repeat_tags_and_always_send_the_limit() {
        let query = DeviceQuery {
            tags: vec!["site=lyon".into(), "floor=2".into()],
            hardware: Some("rpi4".into()),
            online: Some(false),
            after: Some("dev 9".into()),
            limit: 50,
        };
        assert_eq!(
            ApiUrl::new("http://h").url(&["api", "v1", "devices"], &query.pairs()),
            "http://h/api/v1/devices?tag=site%3Dlyon&tag=floor%3D2&hardware=rpi4&online=false&after=dev+9&limit=50"
        );
        let plain = DeviceQuery {
            limit: 1000,
            ..Default::default()
        };
        assert_eq!(plain.pairs(), vec![("limit", "1000".to_string())]);
    }

    #[test]
    fn stream_queries_carry_only_what_was_asked() {
        let query = StreamQuery {
            after_seq: Some(7),
            limit: 10,
            model: Some("digits".into()),
        };
        assert_eq!(
            query.pairs(),
            vec![
                ("limit", "10".to_string()),
                ("after_seq", "7".to_string()),
                ("model", "digits".to_string())
            ]
        );
    }
}
