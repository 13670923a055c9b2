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
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    if path == "/api/v1/health" || path == "/api/v1/root" || path.starts_with("/artifacts/") {
        return None;
    }
    if path.starts_with("/api/v1/tokens") || path.starts_with("/api/v1/audit") {
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

#[cfg(test)]
mod tests {
    use super::*;

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
