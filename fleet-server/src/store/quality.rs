//! A model assignment's quality settings: a candidate version in shadow
//! beside the assigned one, and an A/B split with a second version. They
//! live on the assignment row (device or fleet-wide), so a device's desired
//! state is signed from one place; assigning another version clears them.

use std::collections::BTreeMap;

use edgefleet_shared::quality::OutputComparison;
use serde::{Deserialize, Serialize};

use super::{ModelRecord, StoreError};

/// Run `version` in shadow beside the assigned version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShadowSettings {
    /// The candidate version (of the same model).
    pub version: u64,
    /// Share of requests also run on the candidate, in (0, 1].
    pub sample_rate: f64,
    /// Per output; outputs not listed compare top-1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub compare: Vec<OutputComparison>,
}

/// Serve `share` of client keys with `version` (variant "b").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SplitSettings {
    pub version: u64,
    /// In [0, 1].
    pub share: f64,
    /// Hashed with each client key: a new name reshuffles keys.
    pub experiment: String,
}

/// Both settings of one assignment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AssignedQuality {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitSettings>,
}

impl AssignedQuality {
    pub fn is_empty(&self) -> bool {
        self.shadow.is_none() && self.split.is_none()
    }

    /// The stored column: NULL when empty.
    pub(crate) fn to_column(&self) -> Option<String> {
        (!self.is_empty()).then(|| serde_json::to_string(self).unwrap_or_default())
    }

    pub(crate) fn from_column(text: Option<&str>) -> Result<Self, StoreError> {
        match text {
            None => Ok(Self::default()),
            Some(t) => serde_json::from_str(t).map_err(|e| {
                StoreError::Task(format!(
                    "stored assignment quality settings unreadable: {e}"
                ))
            }),
        }
    }

    /// Applies one change, keeping the other setting.
    pub fn apply(&mut self, change: &QualityChange) {
        match change {
            QualityChange::Shadow(s) => self.shadow.clone_from(s),
            QualityChange::Split(s) => self.split.clone_from(s),
        }
    }
}

/// One change to an assignment's quality settings (`None`: stop it).
#[derive(Debug, Clone, PartialEq)]
pub enum QualityChange {
    Shadow(Option<ShadowSettings>),
    Split(Option<SplitSettings>),
}

impl QualityChange {
    /// The version the change names, which must exist.
    pub fn version(&self) -> Option<u64> {
        match self {
            Self::Shadow(s) => s.as_ref().map(|s| s.version),
            Self::Split(s) => s.as_ref().map(|s| s.version),
        }
    }
}

/// The settings of one model on one device, with the records of the
/// versions they name, for signing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResolvedQuality {
    pub shadow: Option<(ShadowSettings, ModelRecord)>,
    pub split: Option<(SplitSettings, ModelRecord)>,
}

/// Per model name.
pub type DeviceQuality = BTreeMap<String, ResolvedQuality>;
