//! Dashboard login sessions, shared by the dashboard (which makes and
//! ends them) and the API (which accepts their cookie).
//!
//! Logging in with an operator token makes a session: a random 256-bit id
//! in a cookie (`HttpOnly`, `SameSite=Strict`, `Secure` over HTTPS) and a
//! random CSRF token the pages carry. The session holds only the token's
//! id: every request looks the token up again, so revoking the token ends
//! its sessions and its scope is always current. Sessions live in memory:
//! a server restart logs everyone out.
//!
//! A state-changing call made with the session cookie must carry the CSRF
//! token in `X-CSRF-Token` (the dashboard's script sends it); a
//! cross-site page can neither read it nor send that header without a
//! CORS preflight, which the server never grants.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth::TokenRecord;
use crate::store::{Store, StoreError};

/// The cookie's name.
pub const COOKIE: &str = "edgefleet_session";
/// The header a state-changing call made with the cookie must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session unused for this long ends.
pub const IDLE: Duration = Duration::from_secs(8 * 3600);
/// A session ends this long after login, used or not.
pub const LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Sessions kept at most; past this the oldest go first.
const MAX_SESSIONS: usize = 10_000;

/// One login.
#[derive(Debug, Clone)]
pub struct Session {
    pub token_id: String,
    pub csrf: String,
    created: Instant,
    last_used: Instant,
}

/// The server's sessions, by id.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the system has a random source");
    hex::encode(bytes)
}

impl Session {
    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.last_used) > IDLE || now.duration_since(self.created) > LIFETIME
    }
}

impl Sessions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session for the token; returns its id and the session.
    pub fn create(&self, token_id: &str) -> (String, Session) {
        let now = Instant::now();
        let session = Session {
            token_id: token_id.to_string(),
            csrf: random_hex(),
            created: now,
            last_used: now,
        };
        let id = random_hex();
        let mut map = self.map();
        map.retain(|_, s| !s.expired(now));
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| id.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session with this id (and marks it used).
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut map = self.map();
        let session = map.get_mut(id)?;
        if session.expired(now) {
            map.remove(id);
            return None;
        }
        session.last_used = now;
        Some(session.clone())
    }

    pub fn remove(&self, id: &str) {
        self.map().remove(id);
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
        let Some(session) = self.get(session_id) else {
            return Ok(None);
        };
        match store.token_for_auth(&session.token_id).await? {
            Some((record, _)) if record.revoked_at.is_none() => Ok(Some((record, session))),
            _ => {
                self.remove(session_id);
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_round_trip_and_end() {
        let sessions = Sessions::default();
        let (id, s) = sessions.create("tok1");
        assert_eq!(sessions.get(&id).unwrap().token_id, "tok1");
        assert!(csrf_matches(&s, Some(&s.csrf)));
        assert!(!csrf_matches(&s, Some(&"0".repeat(64))));
        assert!(!csrf_matches(&s, None));
        assert!(sessions.get(&"f".repeat(64)).is_none());
        sessions.remove(&id);
        assert!(sessions.get(&id).is_none());
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
