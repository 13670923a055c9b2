//! Operator tokens: who may call the API, and with which scope.
//!
//! A token is `eft_<id>_<secret>`: `id` (16 hex digits) names it in lists,
//! logs and the audit log; `secret` (64 hex digits, 256 random bits) is
//! shown once, when the token is created, and only its SHA-256 is stored.
//! A fast hash is enough for 256 random bits (there is nothing to
//! brute-force); the comparison is constant-time.
//!
//! Scopes are ordered: `read` may read everything but tokens and the audit
//! log; `write` may also push models, attach test vectors and specs, and
//! deploy; `admin` may also manage tokens and read the audit log.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a token may do; each scope includes the ones before it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Self::Read),
            "write" => Ok(Self::Write),
            "admin" => Ok(Self::Admin),
            other => Err(format!("unknown scope {other:?}: use read, write or admin")),
        }
    }
}

/// A token as stored and listed (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub created_at: u64,
    /// Set once revoked; a revoked token is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

/// A freshly made token: the record to store, the hash to store with it,
/// and the token text to hand to the operator once.
pub struct NewToken {
    pub record: TokenRecord,
    pub hash: String,
    pub token: String,
}

const PREFIX: &str = "eft_";

/// Makes a token with a random id and secret.
pub fn generate(name: &str, scope: Scope, now: u64) -> NewToken {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    getrandom::fill(&mut id).expect("the system has a random source");
    getrandom::fill(&mut secret).expect("the system has a random source");
    let (id, secret) = (hex::encode(id), hex::encode(secret));
    NewToken {
        hash: hash_secret(&secret),
        token: format!("{PREFIX}{id}_{secret}"),
        record: TokenRecord {
            id,
            name: name.to_string(),
            scope,
            created_at: now,
            revoked_at: None,
        },
    }
}

/// Splits a token into its id and secret.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` hashes to `stored` (constant time in the contents).
pub fn matches(secret: &str, stored: &str) -> bool {
    let computed = hash_secret(secret);
    computed.len() == stored.len()
        && computed
            .bytes()
            .zip(stored.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The scope an API call needs, from its method and path; `None` for the
/// calls anyone may make (health, the public root document, artifacts,
/// whose content is addressed by the hash a signed document names).
pub fn required_scope(method: &http::Method, path: &str) -> Option<Scope> {
    // The device-key registration authenticates the device itself (its
    // enrollment credentials), not an operator.
    if path == "/api/v1/health"
        || path == "/api/v1/root"
        || path == "/api/v1/openapi.json"
        || path == "/api/v1/device-key"
        || path.starts_with("/artifacts/")
    {
        return None;
    }
    if path.starts_with("/api/v1/tokens")
        || path.starts_with("/api/v1/audit")
        || path.starts_with("/api/v1/broker")
    {
        return Some(Scope::Admin);
    }
    // Enrolling and revoking devices hands out or takes away credentials;
    // a device's key decides whose messages are believed.
    if (*method == http::Method::POST && (path == "/api/v1/devices" || path.ends_with("/revoke")))
        || (path.starts_with("/api/v1/devices/") && path.ends_with("/key"))
    {
        return Some(Scope::Admin);
    }
    Some(match *method {
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS => Scope::Read,
        _ => Scope::Write,
    })
}

/// The operator behind an authenticated call (request extension).
#[derive(Debug, Clone)]
pub struct Operator {
    pub token_id: String,
    pub name: String,
    pub scope: Scope,
}

// ---- device credentials ------------------------------------------------------

/// A new device password: 128 random bits, hex.
pub fn device_password() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the system has a random source");
    hex::encode(bytes)
}

/// PBKDF2 iterations of Mosquitto's `$7$` hashes (what `mosquitto_passwd`
/// writes).
const MOSQUITTO_ITERATIONS: u32 = 101;

/// Hashes a device password the way `mosquitto_passwd` does
/// (`$7$<iterations>$<salt>$<PBKDF2-SHA512>`, standard base64): the
/// server stores only this, checks it itself for the embedded broker, and
/// writes it as is into a Mosquitto password file.
pub fn mosquitto_hash(password: &str) -> String {
    let mut salt = [0u8; 12];
    getrandom::fill(&mut salt).expect("the system has a random source");
    mosquitto_hash_with(password, &salt, MOSQUITTO_ITERATIONS)
}

fn mosquitto_hash_with(password: &str, salt: &[u8], iterations: u32) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), salt, iterations, &mut out);
    format!("$7${iterations}${}${}", b64.encode(salt), b64.encode(out))
}

/// Whether `password` matches a `$7$` hash (constant time in the hash).
pub fn verify_mosquitto(password: &str, stored: &str) -> bool {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut parts = stored.split('$');
    let (Some(""), Some("7"), Some(iterations), Some(salt), Some(_), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Ok(iterations), Ok(salt)) = (iterations.parse::<u32>(), b64.decode(salt)) else {
        return false;
    };
    if iterations == 0 || iterations > 1_000_000 {
        return false;
    }
    let computed = mosquitto_hash_with(password, &salt, iterations);
    computed.len() == stored.len()
        && computed
            .bytes()
            .zip(stored.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// A Mosquitto ACL file for a fleet under `prefix`: the server's user
/// reads and writes everything under the prefix; each device (user name =
/// device id) publishes only its own status, events, telemetry and
/// results, and reads only its own desired state and receipts, the
/// server's status and the root chain.
pub fn mosquitto_acl(prefix: &str, server_user: &str) -> String {
    let p = prefix;
    format!(
        "# edgefleet: the server, then every device under its own id only.\n\
         user {server_user}\n\
         topic readwrite {p}/#\n\n\
         pattern write {p}/devices/%u/status\n\
         pattern write {p}/devices/%u/events\n\
         pattern write {p}/devices/%u/telemetry\n\
         pattern write {p}/devices/%u/results\n\
         pattern read {p}/devices/%u/desired\n\
         pattern read {p}/devices/%u/receipts\n\
         pattern read {p}/server/status\n\
         pattern read {p}/roots\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_passwords_hash_like_mosquitto_passwd() {
        // Written by `mosquitto_passwd -b -c pw pi-kitchen-1 s3cret-pass`
        // (Mosquitto 2.0, Debian 12).
        let from_mosquitto = "$7$101$CsbGLthmurCo4O4O$M2sLdaV5S0QrAzvXxIwIJhE8B5Cs2BUloDm8PdbVLg12IPADLG6LRtAkLfNN/7mdvDO1+7ESMpyzndeCvy3SWw==";
        assert!(verify_mosquitto("s3cret-pass", from_mosquitto));
        assert!(!verify_mosquitto("s3cret-pasS", from_mosquitto));
        let password = device_password();
        let ours = mosquitto_hash(&password);
        assert!(ours.starts_with("$7$101$"));
        assert!(verify_mosquitto(&password, &ours));
        assert!(!verify_mosquitto("", &ours));
        assert_ne!(mosquitto_hash(&password), ours, "salted");
        for bad in [
            "",
            "$7$",
            "$6$101$AA==$AA==",
            "$7$0$AA==$AA==",
            "$7$101$!!$AA==",
            "plain",
        ] {
            assert!(!verify_mosquitto("x", bad), "{bad:?}");
        }
    }

    #[test]
    fn generated_tokens_parse_and_match_only_their_own_hash() {
        let a = generate("ci", Scope::Write, 5);
        let b = generate("ci", Scope::Write, 5);
        assert_ne!(a.token, b.token);
        let (id, secret) = parse(&a.token).unwrap();
        assert_eq!(id, a.record.id);
        assert!(matches(secret, &a.hash));
        assert!(!matches(secret, &b.hash));
        assert!(!a.hash.contains(secret), "only the hash is stored");
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        let good = generate("x", Scope::Read, 0).token;
        for bad in [
            "",
            "Bearer x",
            &good[4..],
            &good[..good.len() - 1],
            &good.replace("eft_", "efx_"),
            &format!("{good}0"),
            "eft_zzzzzzzzzzzzzzzz_00",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn scopes_are_ordered_and_calls_need_the_right_one() {
        use http::Method;
        assert!(Scope::Admin > Scope::Write && Scope::Write > Scope::Read);
        assert_eq!(required_scope(&Method::GET, "/api/v1/health"), None);
        assert_eq!(required_scope(&Method::GET, "/artifacts/ab.zst"), None);
        assert_eq!(
            required_scope(&Method::GET, "/api/v1/devices"),
            Some(Scope::Read)
        );
        assert_eq!(
            required_scope(&Method::POST, "/api/v1/deployments"),
            Some(Scope::Write)
        );
        assert_eq!(
            required_scope(&Method::PUT, "/api/v1/models/m/versions/1/spec"),
            Some(Scope::Write)
        );
        assert_eq!(
            required_scope(&Method::GET, "/api/v1/tokens"),
            Some(Scope::Admin)
        );
        assert_eq!(
            required_scope(&Method::GET, "/api/v1/audit"),
            Some(Scope::Admin)
        );
        assert_eq!(
            "write".parse::<Scope>().unwrap(),
            Scope::Write,
            "scopes parse from their names"
        );
        assert!("root".parse::<Scope>().is_err());
    }
}
