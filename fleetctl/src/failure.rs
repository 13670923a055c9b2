//! How a command fails: what went wrong and which exit code says so.
//! Scripts branch on the code, so each kind of failure keeps its number.

use crate::client::ClientError;

/// fleetctl's exit codes (besides 0, success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The server refused or failed the request.
    Refused = 1,
    /// Bad usage or local input (clap's own usage errors are 2 as well).
    Usage = 2,
    /// The server (or, flashing, the board) could not be reached.
    Unreachable = 3,
    /// Not allowed: no token, a bad or revoked one, or too small a scope.
    NotAllowed = 4,
}

impl Exit {
    /// The process exit status.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// A failed command: its exit code and the error to print.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub error: anyhow::Error,
}

impl Failure {
    /// A failure with this exit code.
    pub fn new(exit: Exit, error: impl Into<anyhow::Error>) -> Self {
        Self {
            exit,
            error: error.into(),
        }
    }

    /// The same failure, with `context` said first.
    pub fn context(self, context: String) -> Self {
        Self {
            exit: self.exit,
            error: self.error.context(context),
        }
    }
}

/// A usage or local-input failure (exit 2).
pub fn usage(error: impl Into<anyhow::Error>) -> Failure {
    Failure::new(Exit::Usage, error)
}

/// A refused or failed request (exit 1).
pub fn refused(error: impl Into<anyhow::Error>) -> Failure {
    Failure::new(Exit::Refused, error)
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let exit = match &e {
            ClientError::Unreachable { .. } => Exit::Unreachable,
            ClientError::Api { status, .. } if matches!(status.as_u16(), 401 | 403) => {
                Exit::NotAllowed
            }
            ClientError::TokenNotAHeader
            | ClientError::CaCertUnreadable { .. }
            | ClientError::CaCertInvalid { .. } => Exit::Usage,
            ClientError::Setup(_)
            | ClientError::Transport { .. }
            | ClientError::Api { .. }
            | ClientError::Decode { .. } => Exit::Refused,
        };
        Self::new(exit, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16) -> ClientError {
        ClientError::Api {
            status: reqwest::StatusCode::from_u16(status).expect("a valid status"),
            message: "no".into(),
        }
    }

    #[test]
    fn api_refusals_map_to_their_exit_codes() {
        assert_eq!(Failure::from(api(401)).exit, Exit::NotAllowed);
        assert_eq!(Failure::from(api(403)).exit, Exit::NotAllowed);
        assert_eq!(Failure::from(api(404)).exit, Exit::Refused);
        assert_eq!(Failure::from(api(409)).exit, Exit::Refused);
        assert_eq!(
            Failure::from(ClientError::TokenNotAHeader).exit,
            Exit::Usage
        );
        assert_eq!(Exit::NotAllowed.code(), 4);
    }
}
