//! What model slots and agent builds share about the files they name.

use serde::{Deserialize, Serialize};

/// A compressed (zstd) copy of an artifact: a model file or an agent
/// executable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compressed {
    /// Exact size of the compressed file; downloads stop here.
    pub size: u64,
    /// Where to download it, tried in order (before the plain URLs).
    pub urls: Vec<String>,
}
