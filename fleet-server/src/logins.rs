//! Dashboard login sessions, shared by the dashboard (which makes and
//! ends them) and the API (which accepts their cookie).
//!
//! Logging in with an operator token makes a session: a random 256-bit id
//! in a cookie (`HttpOnly`, `SameSite=Strict`, `Secure` over HTTPS) and a
//! random CSRF token the pages carry. The session holds only the token's
//! id: every request looks the token up again, so revoking the token ends
//! its sessions and its scope is always current.
//!
//! Sessions live in the store (`dashboard_sessions`), so they survive a
//! server restart and every replica of the fleet on one database accepts
//! a login made through any of them. The store keeps only the SHA-256 of
//! each session id: a copy of the database logs nobody in. A request reads
//! its session (checking expiry); the time of last use is written at most
//! once a minute per session, so idle expiry is that much coarse and
//! browsing the dashboard does not write to the database on every page.
//! Ended sessions are deleted when read and whenever someone logs in, and
//! one token keeps at most [`PER_TOKEN`] sessions.
//!
//! A state-changing call made with the session cookie must carry the CSRF
//! token in `X-CSRF-Token` (the dashboard's script sends it); a
//! cross-site page can neither read it nor send that header without a
//! CORS preflight, which the server never grants.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::auth::TokenRecord;
use crate::store::{SessionRules, Store, StoreError};

/// One login, as stored (its id only as a hash).
pub use crate::store::DashboardSession as Session;

/// The cookie's name.
pub const COOKIE: &str = "edgefleet_session";
/// The header a state-changing call made with the cookie must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session unused for this long ends.
pub const IDLE: Duration = Duration::from_secs(8 * 3600);
/// A session ends this long after login, used or not.
pub const LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Sessions one token keeps at most; past this its least recently used
/// go first.
pub const PER_TOKEN: u32 = 100;
/// A session's last use is written when the stored one is at least this
/// old (seconds).
const TOUCH_AFTER_SECS: u64 = 60;

/// When sessions end, as the store applies it.
pub const RULES: SessionRules = SessionRules {
    idle_secs: IDLE.as_secs(),
    lifetime_secs: LIFETIME.as_secs(),
    per_token: PER_TOKEN,
};

/// The server's sessions: a handle that reads and writes them in the
/// store passed to each call.
#[derive(Debug, Default)]
pub struct Sessions {}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the system has a random source");
    hex::encode(bytes)
}

/// What the store keeps of a session id.
pub fn id_hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

impl Sessions {
    /// A new session for the token; returns its id (for the cookie) and
    /// the session.
    pub async fn create(
        &self,
        store: &Store,
        token_id: &str,
    ) -> Result<(String, Session), StoreError> {
        let now = edgefleet_shared::unix_now();
        let id = random_hex();
        let session = Session {
            id_sha256: id_hash(&id),
            token_id: token_id.to_string(),
            csrf: random_hex(),
            created_at: now,
            last_used: now,
        };
        store.create_dashboard_session(&session, &RULES).await?;
        Ok((id, session))
    }

    /// The live session with this id (marking it used, at most once a
    /// minute).
    pub async fn get(&self, store: &Store, id: &str) -> Result<Option<Session>, StoreError> {
        let now = edgefleet_shared::unix_now();
        let hash = id_hash(id);
        let Some(mut session) = store.dashboard_session(&hash, now, &RULES).await? else {
            return Ok(None);
        };
        if now >= session.last_used + TOUCH_AFTER_SECS {
            store.touch_dashboard_session(&hash, now).await?;
            session.last_used = now;
        }
        Ok(Some(session))
    }

    /// Ends a session (logout).
    pub async fn remove(&self, store: &Store, id: &str) -> Result<(), StoreError> {
        store.delete_dashboard_session(&id_hash(id)).await
    }
}

/// The session id from a request's `Cookie` headers.
pub fn from_cookies(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value that starts a session.
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends one.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Whether the CSRF token presented matches the session's (constant time
/// in the contents).
pub fn csrf_matches(session: &Session, presented: Option<&str>) -> bool {
    let Some(presented) = presented else {
        return false;
    };
    presented.len() == session.csrf.len()
        && presented
            .bytes()
            .zip(session.csrf.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

impl Sessions {
    /// The token behind a live session; `None` when the session is unknown
    /// or expired or its token revoked (the session is then ended).
    pub async fn token(
        &self,
        store: &Store,
        session_id: &str,
    ) -> Result<Option<(TokenRecord, Session)>, StoreError> {
        let Some(session) = self.get(store, session_id).await? else {
            return Ok(None);
        };
        match store.token_for_auth(&session.token_id).await? {
            Some((record, _)) if record.revoked_at.is_none() => Ok(Some((record, session))),
            _ => {
                self.remove(store, session_id).await?;
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_round_trip_and_end_keeping_only_the_id_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("fleet.db").to_str().unwrap())
            .await
            .unwrap();
        let sessions = Sessions::default();
        let (id, s) = sessions.create(&store, "tok1").await.unwrap();
        assert_eq!(s.id_sha256, id_hash(&id));
        assert_ne!(s.id_sha256, id);
        let got = sessions.get(&store, &id).await.unwrap().unwrap();
        assert_eq!(got.token_id, "tok1");
        assert_eq!(got.csrf, s.csrf);
        assert!(csrf_matches(&s, Some(&s.csrf)));
        assert!(!csrf_matches(&s, Some(&"0".repeat(64))));
        assert!(!csrf_matches(&s, None));
        // The hash itself is no session id.
        assert!(sessions.get(&store, &s.id_sha256).await.unwrap().is_none());
        assert!(sessions
            .get(&store, &"f".repeat(64))
            .await
            .unwrap()
            .is_none());
        sessions.remove(&store, &id).await.unwrap();
        assert!(sessions.get(&store, &id).await.unwrap().is_none());
    }

    #[test]
    fn cookies_are_parsed_strictly() {
        let mut headers = http::HeaderMap::new();
        let id = "a".repeat(64);
        headers.insert(
            http::header::COOKIE,
            format!("other=1; {COOKIE}={id}").parse().unwrap(),
        );
        assert_eq!(from_cookies(&headers), Some(id));
        headers.insert(
            http::header::COOKIE,
            format!("{COOKIE}=<script>").parse().unwrap(),
        );
        assert_eq!(from_cookies(&headers), None);
        let cookie = set_cookie("x", true);
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
            assert!(cookie.contains(part), "{cookie}");
        }
        assert!(!set_cookie("x", false).contains("Secure"));
    }
}
