//! The fleet server as the uplink sees it: the keys its receipts and
//! status must be signed by ([`ServerKeys`], kept current by the update
//! task as the root rotates), and whether it is online and storing
//! ([`ServerPresence`], from its signed status and receipts).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use edgefleet_shared::signed_message::{MessageError, SignedMessage};
use edgefleet_shared::{PublicKey, RootDocument, ServerStatus};

/// The fleet server's online keys: the trusted root's desired-state role,
/// kept current by the updater as the root rotates.
#[derive(Debug, Clone, Default)]
pub struct ServerKeys(Arc<(RwLock<Vec<PublicKey>>, AtomicU64)>);

impl ServerKeys {
    /// Takes the online keys of `root`, the newly trusted root.
    pub fn set(&self, root: &RootDocument) {
        let keys = root.desired_keys().map(|(_, k)| *k).collect();
        *self.0 .0.write().unwrap_or_else(|e| e.into_inner()) = keys;
        self.0 .1.fetch_add(1, Ordering::Release);
    }

    /// Counts the changes of keys, so a message refused for its key can be
    /// checked again once the keys change.
    pub fn generation(&self) -> u64 {
        self.0 .1.load(Ordering::Acquire)
    }

    /// Opens a message on `topic` that must be signed by the server.
    pub fn open<'a>(&self, payload: &'a [u8], topic: &str) -> Result<&'a [u8], MessageError> {
        let keys = self.0 .0.read().unwrap_or_else(|e| e.into_inner());
        SignedMessage::open(payload, topic, keys.iter())
    }
}

/// Whether the fleet server is storing, from its signed status: a newer
/// server connection's status replaces an older one's, and within one
/// connection "offline" (its last will) is final, so a replayed older
/// status changes nothing. A signed receipt also proves a server is
/// storing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerPresence {
    /// The newest server connection heard of.
    session: Option<u64>,
    /// That connection said "offline".
    ended: bool,
    /// Heard "online" (or a receipt) since the agent's own connection.
    online: bool,
}

impl ServerPresence {
    /// Whether the server is taken to be storing now.
    pub fn online(&self) -> bool {
        self.online && !self.ended
    }

    /// Takes a verified status.
    pub fn status(&mut self, status: &ServerStatus) {
        match self.session {
            Some(known) if status.session < known => {}
            Some(known) if status.session == known => {
                if status.online {
                    self.online = true;
                } else {
                    self.ended = true;
                }
            }
            _ => {
                self.session = Some(status.session);
                self.ended = !status.online;
                self.online = status.online;
            }
        }
    }

    /// A verified receipt arrived.
    pub fn receipt(&mut self) {
        self.online = true;
        self.ended = false;
    }

    /// The agent's connection to the broker is gone: wait to hear again.
    pub fn disconnected(&mut self) {
        self.online = false;
    }
}

#[cfg(test)]
mod tests {
    use edgefleet_shared::signed_message::seal;
    use edgefleet_shared::SecretKey;

    use super::*;

    fn server(online: bool, session: u64) -> ServerStatus {
        ServerStatus {
            online,
            at: 0,
            session,
        }
    }

    #[test]
    fn a_replayed_older_server_status_changes_nothing() {
        let mut p = ServerPresence::default();
        assert!(!p.online(), "nothing heard yet");
        p.status(&server(true, 5));
        assert!(p.online());
        // An old connection's "offline", replayed: ignored.
        p.status(&server(false, 4));
        assert!(p.online());
        // This connection's last will is final for it...
        p.status(&server(false, 5));
        assert!(!p.online());
        p.status(&server(true, 5));
        assert!(!p.online(), "a replayed online of an ended connection");
        // ...until a newer connection says online.
        p.status(&server(true, 6));
        assert!(p.online());
    }

    #[test]
    fn after_a_reconnect_the_retained_status_counts_again() {
        let mut p = ServerPresence::default();
        p.status(&server(true, 7));
        p.disconnected();
        assert!(!p.online(), "unknown while the agent is not connected");
        // The broker hands the retained status of the same connection.
        p.status(&server(true, 7));
        assert!(p.online());
    }

    #[test]
    fn a_signed_receipt_proves_the_server_is_storing() {
        let mut p = ServerPresence::default();
        p.status(&server(false, 9));
        assert!(!p.online());
        p.receipt();
        assert!(p.online());
    }

    #[test]
    fn only_the_online_keys_of_the_trusted_root_open_server_messages() {
        let root_key = SecretKey::from_seed([1; 32]);
        let online = SecretKey::from_seed([2; 32]);
        let device = SecretKey::from_seed([3; 32]);
        let root = RootDocument::new(1, u64::MAX, &[root_key.public()], 1, &[online.public()]);
        let keys = ServerKeys::default();
        keys.set(&root);
        let topic = "edgefleet/v1/devices/d/receipts";
        let msg = br#"{"schema":1,"device_id":"d","seqs":[[1,2]]}"#;
        assert_eq!(keys.open(&seal(topic, msg, &online), topic).unwrap(), msg);
        for forged in [
            seal(topic, msg, &device),
            seal(topic, msg, &root_key),
            msg.to_vec(),
        ] {
            assert!(keys.open(&forged, topic).is_err());
        }
    }
}
