//! Model updates from the fleet.
//!
//! [`decide`] holds the decisions, free of I/O: whether an incoming
//! desired state is applied, and the steps that bring the served models to
//! it. [`task`] is the update task that carries them out (download,
//! install, load, test vector, atomic activation, soak, rollback), with
//! its side effects behind traits ([`crate::clock::Clock`],
//! [`crate::download::Fetcher`]) so it is unit-tested without network or
//! real time. [`startup`] serves what the store holds before any network,
//! rolling back a version that keeps bringing the agent down.

pub mod decide;
pub mod startup;
pub mod task;

pub use startup::{serve_installed, StartupRollback};
pub use task::Updater;

use crate::engine::Selection;
use crate::model_store::InstalledModel;
use crate::registry::ServedModel;

/// The served model for an installed version and the engine chosen for it.
fn served(installed: &InstalledModel, selection: Selection) -> ServedModel {
    let slot = &installed.slot;
    let mut model = ServedModel::new(
        slot.name.clone(),
        slot.version,
        slot.sha256.clone(),
        slot.format,
        selection,
    );
    model.upload_results = slot.upload_results;
    // The drift spec signed with this version, so a model served from the
    // store bins its requests from the start, even when the stored desired
    // state has expired while the device was offline; the current desired
    // state's spec replaces it when one is applied.
    model.quality.apply_drift(slot.drift.as_ref());
    model
}
