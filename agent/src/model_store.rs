//! The on-disk model store.
//!
//! ```text
//! {data_dir}/models/{name}/{version}/model.{onnx|tflite}
//! {data_dir}/models/{name}/{version}/slot.json     the signed slot it came from
//! {data_dir}/models/{name}/active                  {"version": V, "previous": P, "soaking": {...}}
//! {data_dir}/models/{name}/rejected                versions that failed here: never installed again
//! {data_dir}/models/{name}/loading                 {"version": V, "sha256": H, "attempts": N} while V loads
//! {data_dir}/staging/{sha256}.part                 downloads in progress
//! {data_dir}/candidates/{sha256}.{onnx|tflite}      shadow candidates and A/B variants
//! ```
//!
//! A version directory is complete before it gets its final name (it is
//! assembled under a temporary name and renamed), and `active` is replaced
//! atomically, so after a crash at any point the store names a version
//! whose files are all there. The previous version is kept for rollback;
//! older ones are removed.
//!
//! Shadow candidates and A/B variants live apart from the versions, named
//! by hash: they survive a restart without a new download, yet no
//! `active` pointer can name them, so they are never served as a model's
//! version by accident. They are removed once no slot names them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use edgefleet_shared::{ModelFormat, ModelSlot};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::durable::{rename_durable, sync_dir, write_atomic};

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("model store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("model store entry {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `active` pointer of one model name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivePointer {
    pub version: u64,
    pub previous: Option<u64>,
    /// Set while `version` soaks after its activation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soaking: Option<Soaking>,
}

/// A version under watch, as persisted: it survives restarts, and a
/// version that keeps the agent from running (it restarted
/// [`MAX_SOAK_RESTARTS`] times while soaking) is rolled back at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Soaking {
    /// Unix seconds of the activation.
    pub since: u64,
    /// Agent starts since the activation.
    #[serde(default)]
    pub restarts: u32,
    /// The previous version's requests, errors and p95 latency (us) when
    /// it was replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<(u64, u64, Option<f64>)>,
}

/// Starts while soaking after which the version is taken to be what
/// brings the agent down.
pub const MAX_SOAK_RESTARTS: u32 = 3;

/// Loads of a version that the agent did not live through after which the
/// version is taken to be what kills it (a runtime that aborts or
/// segfaults on it) and is not loaded again. One is forgiven: power can
/// fail during any load.
pub const MAX_DIED_LOADING: u32 = 2;

/// The version being loaded, as persisted before the load starts and
/// removed when it ends either way: finding it at the next load means
/// the agent died part-way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LoadingMark {
    version: u64,
    sha256: String,
    attempts: u32,
}

/// A version that failed on this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub version: u64,
    pub sha256: String,
    pub reason: String,
}

/// An installed model version.
#[derive(Debug, Clone)]
pub struct InstalledModel {
    pub slot: ModelSlot,
    pub path: PathBuf,
}

impl InstalledModel {
    /// The version in `dir` (its `slot.json` and model file), checked
    /// against the slot's hash.
    pub fn read(dir: &Path) -> Result<Self, StoreError> {
        let slot_path = dir.join("slot.json");
        let bytes = fs::read(&slot_path).map_err(io_err(&slot_path))?;
        let slot: ModelSlot = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: slot_path.clone(),
            reason: e.to_string(),
        })?;
        let path = dir.join(format!("model.{}", slot.format.extension()));
        let actual = sha256_file(&path).map_err(io_err(&path))?;
        if actual != slot.sha256 {
            return Err(StoreError::Corrupt {
                path,
                reason: format!("sha256 is {actual}, expected {}", slot.sha256),
            });
        }
        Ok(Self { slot, path })
    }

    /// The directory that holds this version.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
}

impl ModelStore {
    /// Opens (creating if needed) the store under `data_dir` and removes
    /// leftovers of interrupted installs.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let store = Self {
            root: data_dir.to_path_buf(),
        };
        for dir in [store.models_dir(), store.staging_dir()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        store.remove_incomplete_installs()?;
        Ok(store)
    }

    fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Where a download of `sha256` is assembled.
    pub fn staging_path(&self, sha256: &str) -> PathBuf {
        self.staging_dir().join(format!("{sha256}.part"))
    }

    /// Removes staged downloads of artifacts no longer wanted (`keep`
    /// holds the hashes the desired state still names: a download that
    /// failed part-way resumes from its staging file later).
    pub fn clean_staging(&self, keep: &[&str]) {
        let Ok(entries) = fs::read_dir(self.staging_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let sha = name.to_string_lossy();
            let sha = sha.strip_suffix(".part").unwrap_or(&sha);
            let sha = sha.strip_suffix(".zst").unwrap_or(sha);
            if !keep.contains(&sha) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn candidates_dir(&self) -> PathBuf {
        self.root.join("candidates")
    }

    /// Where a verified shadow candidate or A/B variant is kept.
    pub fn candidate_path(&self, sha256: &str, format: ModelFormat) -> PathBuf {
        self.candidates_dir()
            .join(format!("{sha256}.{}", format.extension()))
    }

    /// The kept file with this hash, if it is there and intact (a damaged
    /// one is removed, to be downloaded again).
    pub fn candidate(&self, sha256: &str, format: ModelFormat) -> Option<PathBuf> {
        let path = self.candidate_path(sha256, format);
        match sha256_file(&path) {
            Ok(actual) if actual == sha256 => Some(path),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "kept candidate file is damaged; downloading it again");
                let _ = fs::remove_file(&path);
                None
            }
            Err(_) => None,
        }
    }

    /// Moves a verified staged download into the candidates.
    pub fn keep_candidate(
        &self,
        staged: &Path,
        sha256: &str,
        format: ModelFormat,
    ) -> Result<PathBuf, StoreError> {
        let dir = self.candidates_dir();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = self.candidate_path(sha256, format);
        fs::File::open(staged)
            .and_then(|f| f.sync_all())
            .map_err(io_err(staged))?;
        rename_durable(staged, &path).map_err(io_err(&path))?;
        Ok(path)
    }

    /// Removes kept candidates whose hash `keep` does not hold.
    pub fn clean_candidates(&self, keep: &[&str]) {
        let Ok(entries) = fs::read_dir(self.candidates_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let sha = name.split('.').next().unwrap_or_default();
            if !keep.contains(&sha) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn name_dir(&self, name: &str) -> PathBuf {
        self.models_dir().join(name)
    }

    fn version_dir(&self, name: &str, version: u64) -> PathBuf {
        self.name_dir(name).join(version.to_string())
    }

    fn remove_incomplete_installs(&self) -> Result<(), StoreError> {
        let models = self.models_dir();
        for entry in fs::read_dir(&models).map_err(io_err(&models))? {
            let dir = entry.map_err(io_err(&models))?.path();
            let Ok(children) = fs::read_dir(&dir) else {
                continue;
            };
            for child in children.flatten() {
                let name = child.file_name();
                if name.to_string_lossy().starts_with(".installing-") {
                    let _ = fs::remove_dir_all(child.path());
                }
            }
        }
        Ok(())
    }

    /// Moves a verified staged file into place as `slot.version` of
    /// `slot.name`. Does not activate it.
    pub fn install(&self, slot: &ModelSlot, staged: &Path) -> Result<InstalledModel, StoreError> {
        let name_dir = self.name_dir(&slot.name);
        fs::create_dir_all(&name_dir).map_err(io_err(&name_dir))?;
        let final_dir = self.version_dir(&slot.name, slot.version);
        let file_name = format!("model.{}", slot.format.extension());
        if final_dir.exists() {
            // Already installed earlier (e.g. a rollback target): trust it
            // only if it is intact.
            let installed = self.load_version(&slot.name, slot.version)?;
            if installed.slot.sha256 == slot.sha256 {
                let _ = fs::remove_file(staged);
                return Ok(installed);
            }
            fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
        }
        let tmp_dir = name_dir.join(format!(".installing-{}", slot.version));
        let _ = fs::remove_dir_all(&tmp_dir);
        fs::create_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
        let model_path = tmp_dir.join(&file_name);
        fs::rename(staged, &model_path).map_err(io_err(staged))?;
        fs::File::open(&model_path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&model_path))?;
        let slot_json = serde_json::to_vec_pretty(slot)
            .expect("a ModelSlot is plain data with string keys and always serialises");
        write_atomic(&tmp_dir.join("slot.json"), &slot_json).map_err(io_err(&tmp_dir))?;
        rename_durable(&tmp_dir, &final_dir).map_err(io_err(&final_dir))?;
        Ok(InstalledModel {
            slot: slot.clone(),
            path: final_dir.join(file_name),
        })
    }

    /// Points `name` at `version` atomically, remembering the version it
    /// replaces, and removes versions that are neither. With `soaking`,
    /// the version is marked as under watch.
    pub fn activate(
        &self,
        name: &str,
        version: u64,
        soaking: Option<Soaking>,
    ) -> Result<ActivePointer, StoreError> {
        let current = self.active_pointer(name)?;
        let previous = match current {
            Some(p) if p.version == version => p.previous,
            Some(p) => Some(p.version),
            None => None,
        };
        let pointer = ActivePointer {
            version,
            previous,
            soaking,
        };
        self.write_pointer(name, &pointer)?;
        self.collect_garbage(name, &pointer);
        Ok(pointer)
    }

    fn write_pointer(&self, name: &str, pointer: &ActivePointer) -> Result<(), StoreError> {
        let path = self.name_dir(name).join("active");
        write_atomic(
            &path,
            &serde_json::to_vec(pointer)
                .expect("an ActivePointer is plain data and always serialises"),
        )
        .map_err(io_err(&path))
    }

    /// Records one more start while `name` soaks; returns the updated
    /// pointer.
    pub fn count_restart(&self, name: &str) -> Result<Option<ActivePointer>, StoreError> {
        let Some(mut pointer) = self.active_pointer(name)? else {
            return Ok(None);
        };
        if let Some(soaking) = &mut pointer.soaking {
            soaking.restarts += 1;
            self.write_pointer(name, &pointer)?;
        }
        Ok(Some(pointer))
    }

    /// The soak of the active version passed: it is no longer watched.
    pub fn confirm(&self, name: &str) -> Result<(), StoreError> {
        if let Some(mut pointer) = self.active_pointer(name)? {
            if pointer.soaking.take().is_some() {
                self.write_pointer(name, &pointer)?;
            }
        }
        Ok(())
    }

    /// Puts the previous version of `name` back (atomically) and records
    /// the replaced one as rejected. Returns the version now active, or
    /// `None` when there is no previous version (nothing changes then,
    /// but the version is still recorded as rejected).
    pub fn roll_back(&self, name: &str, reason: &str) -> Result<Option<u64>, StoreError> {
        let Some(pointer) = self.active_pointer(name)? else {
            return Ok(None);
        };
        let bad = self.load_version(name, pointer.version).ok();
        if let Some(bad) = &bad {
            self.reject(name, bad.slot.version, &bad.slot.sha256, reason)?;
        }
        let Some(previous) = pointer.previous else {
            if pointer.soaking.is_some() {
                self.confirm(name)?;
            }
            return Ok(None);
        };
        let back = ActivePointer {
            version: previous,
            previous: None,
            soaking: None,
        };
        self.write_pointer(name, &back)?;
        self.collect_garbage(name, &back);
        Ok(Some(previous))
    }

    /// Notes (durably) that `version` of `name` is about to be loaded.
    /// Returns how many earlier loads of this same version never ended:
    /// each is an agent that died while loading it.
    pub fn begin_load(&self, name: &str, version: u64, sha256: &str) -> Result<u32, StoreError> {
        let dir = self.name_dir(name);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join("loading");
        let died = match fs::read(&path) {
            // A marker that cannot be read is a write the power cut
            // short: write_atomic makes that a leftover, not a torn file.
            Ok(bytes) => serde_json::from_slice::<LoadingMark>(&bytes)
                .ok()
                .filter(|m| m.version == version && m.sha256 == sha256)
                .map_or(0, |m| m.attempts),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mark = LoadingMark {
            version,
            sha256: sha256.to_string(),
            attempts: died + 1,
        };
        write_atomic(
            &path,
            &serde_json::to_vec(&mark).expect("a LoadingMark is plain data and always serialises"),
        )
        .map_err(io_err(&path))?;
        Ok(died)
    }

    /// The load [`Self::begin_load`] noted ended (whatever its outcome).
    pub fn end_load(&self, name: &str) -> Result<(), StoreError> {
        let path = self.name_dir(name).join("loading");
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.name_dir(name)).map_err(io_err(&path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Records that `version` (with this hash) failed here.
    pub fn reject(
        &self,
        name: &str,
        version: u64,
        sha256: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let dir = self.name_dir(name);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut list = self.rejected(name)?;
        if list
            .iter()
            .any(|r| r.version == version && r.sha256 == sha256)
        {
            return Ok(());
        }
        list.push(Rejected {
            version,
            sha256: sha256.to_string(),
            reason: reason.to_string(),
        });
        // Only the newest few matter (versions only go up).
        let excess = list.len().saturating_sub(16);
        list.drain(..excess);
        let path = dir.join("rejected");
        write_atomic(
            &path,
            &serde_json::to_vec(&list)
                .expect("a list of Rejected is plain data and always serialises"),
        )
        .map_err(io_err(&path))
    }

    /// The versions of `name` that failed here.
    pub fn rejected(&self, name: &str) -> Result<Vec<Rejected>, StoreError> {
        let path = self.name_dir(name).join("rejected");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Stops serving `name` (it is no longer in the desired state). Its
    /// files are removed.
    pub fn deactivate(&self, name: &str) -> Result<(), StoreError> {
        let dir = self.name_dir(name);
        let active = dir.join("active");
        match fs::remove_file(&active) {
            Ok(()) => sync_dir(&dir).map_err(io_err(&dir))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&active)(e)),
        }
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }

    fn collect_garbage(&self, name: &str, keep: &ActivePointer) {
        let Ok(entries) = fs::read_dir(self.name_dir(name)) else {
            return;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(version) = file_name.to_str().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if version != keep.version && Some(version) != keep.previous {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    pub fn active_pointer(&self, name: &str) -> Result<Option<ActivePointer>, StoreError> {
        let path = self.name_dir(name).join("active");
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        path,
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Reads an installed version and checks its file against the hash in
    /// its slot.
    pub fn load_version(&self, name: &str, version: u64) -> Result<InstalledModel, StoreError> {
        InstalledModel::read(&self.version_dir(name, version))
    }

    /// Every model with an active pointer, checked on disk.
    pub fn active_models(&self) -> Result<Vec<InstalledModel>, StoreError> {
        let models = self.models_dir();
        let mut out = Vec::new();
        let mut names: Vec<String> = fs::read_dir(&models)
            .map_err(io_err(&models))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        for name in names {
            let Some(pointer) = self.active_pointer(&name)? else {
                continue;
            };
            match self.load_version(&name, pointer.version) {
                Ok(model) => out.push(model),
                Err(e) => {
                    // The active version is damaged (e.g. storage fault):
                    // fall back to the previous one rather than serve nothing.
                    tracing::error!(model = %name, error = %e, "active model damaged");
                    if let Some(prev) = pointer.previous {
                        let model = self.load_version(&name, prev)?;
                        self.activate(&name, prev, None)?;
                        out.push(model);
                    } else {
                        return Err(e);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Lowercase hex SHA-256 of a file's contents.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(version: u64, content: &[u8]) -> ModelSlot {
        ModelSlot {
            name: "digits".into(),
            version,
            format: ModelFormat::Onnx,
            sha256: hex::encode(Sha256::digest(content)),
            size: content.len() as u64,
            urls: vec!["http://x/".into()],
            inputs: vec![],
            outputs: vec![],
            test_vector: None,
            soak: None,
            upload_results: false,
            zstd: None,
            shadow: None,
            split: None,
            drift: None,
        }
    }

    fn stage(store: &ModelStore, s: &ModelSlot, content: &[u8]) -> PathBuf {
        let p = store.staging_path(&s.sha256);
        fs::write(&p, content).unwrap();
        p
    }

    /// Stages and installs version `v` of `digits` (content `model v{v}`).
    fn install_version(store: &ModelStore, v: u64) -> InstalledModel {
        let content = format!("model v{v}").into_bytes();
        let s = slot(v, &content);
        let staged = stage(store, &s, &content);
        store.install(&s, &staged).unwrap()
    }

    #[test]
    fn install_activate_and_keep_one_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        for v in 1..=3u64 {
            install_version(&store, v);
            let pointer = store.activate("digits", v, None).unwrap();
            assert_eq!(pointer.previous, v.checked_sub(1).filter(|&p| p > 0));
        }
        let active = store.active_models().unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].slot.version, 3);
        assert!(store.load_version("digits", 2).is_ok());
        assert!(
            store.load_version("digits", 1).is_err(),
            "version 1 was garbage-collected"
        );
    }

    #[test]
    fn a_damaged_active_version_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        for v in 1..=2u64 {
            let installed = install_version(&store, v);
            store.activate("digits", v, None).unwrap();
            if v == 2 {
                fs::write(&installed.path, b"bit rot").unwrap();
            }
        }
        let active = store.active_models().unwrap();
        assert_eq!(active[0].slot.version, 1);
        assert_eq!(store.active_pointer("digits").unwrap().unwrap().version, 1);
    }

    #[test]
    fn interrupted_installs_are_cleaned_up_and_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let leftover = dir.path().join("models/digits/.installing-4");
        fs::create_dir_all(&leftover).unwrap();
        fs::write(leftover.join("model.onnx"), b"half").unwrap();
        let store2 = ModelStore::open(dir.path()).unwrap();
        assert!(!leftover.exists());
        assert!(store2.active_models().unwrap().is_empty());
        drop(store);
    }

    #[test]
    fn candidates_are_kept_by_hash_apart_from_versions_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let onnx = ModelFormat::Onnx;
        let shas: Vec<String> = [b"candidate a", b"candidate b"]
            .iter()
            .map(|bytes| {
                let sha = hex::encode(Sha256::digest(bytes));
                let staged = store.staging_path(&sha);
                fs::write(&staged, bytes).unwrap();
                store.keep_candidate(&staged, &sha, onnx).unwrap();
                assert!(!staged.exists());
                sha
            })
            .collect();
        // A reopened store still has them, and serves none of them.
        let store = ModelStore::open(dir.path()).unwrap();
        let kept = store.candidate_path(&shas[0], onnx);
        assert_eq!(store.candidate(&shas[0], onnx), Some(kept));
        assert!(store.active_models().unwrap().is_empty());
        // A damaged file is not used (and goes).
        fs::write(store.candidate_path(&shas[1], onnx), b"bit rot").unwrap();
        assert_eq!(store.candidate(&shas[1], onnx), None);
        assert!(!store.candidate_path(&shas[1], onnx).exists());
        store.clean_candidates(&[]);
        assert_eq!(store.candidate(&shas[0], onnx), None);
    }

    #[test]
    fn deactivate_removes_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let s = slot(1, b"m");
        let staged = stage(&store, &s, b"m");
        store.install(&s, &staged).unwrap();
        store.activate("digits", 1, None).unwrap();
        store.deactivate("digits").unwrap();
        assert!(store.active_models().unwrap().is_empty());
    }

    #[test]
    fn roll_back_restores_the_previous_version_and_rejects_the_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        for v in 1..=2u64 {
            install_version(&store, v);
            let soaking = (v == 2).then_some(Soaking {
                since: 100,
                restarts: 0,
                baseline: Some((10, 0, Some(900.0))),
            });
            store.activate("digits", v, soaking).unwrap();
        }
        let p = store.count_restart("digits").unwrap().unwrap();
        assert_eq!(p.soaking.as_ref().unwrap().restarts, 1);
        assert_eq!(
            store.active_pointer("digits").unwrap(),
            Some(p),
            "persisted"
        );

        assert_eq!(store.roll_back("digits", "p95 too high").unwrap(), Some(1));
        let back = store.active_pointer("digits").unwrap().unwrap();
        assert_eq!((back.version, back.previous, back.soaking), (1, None, None));
        assert_eq!(store.active_models().unwrap()[0].slot.version, 1);
        let rejected = store.rejected("digits").unwrap();
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].version, 2);
        assert_eq!(rejected[0].reason, "p95 too high");
        assert!(
            store.load_version("digits", 2).is_err(),
            "bad version removed"
        );
        // With nothing before it, the version stays but is still rejected
        // and no longer watched.
        assert_eq!(store.roll_back("digits", "again").unwrap(), None);
        assert_eq!(store.active_pointer("digits").unwrap().unwrap().version, 1);
        assert_eq!(store.rejected("digits").unwrap().len(), 2);
    }

    #[test]
    fn confirm_ends_the_soak_and_rejects_are_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let s = slot(1, b"m");
        let staged = stage(&store, &s, b"m");
        store.install(&s, &staged).unwrap();
        let soaking = Soaking {
            since: 1,
            restarts: 0,
            baseline: None,
        };
        store.activate("digits", 1, Some(soaking)).unwrap();
        store.confirm("digits").unwrap();
        assert_eq!(
            store.active_pointer("digits").unwrap().unwrap().soaking,
            None
        );
        store
            .reject("other", 3, &"ab".repeat(32), "test vector")
            .unwrap();
        store
            .reject("other", 3, &"ab".repeat(32), "test vector")
            .unwrap();
        assert_eq!(store.rejected("other").unwrap().len(), 1);
    }

    #[test]
    fn loads_the_agent_died_in_are_counted_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let (v2, v3) = ("22".repeat(32), "33".repeat(32));
        // A load that ends is forgotten.
        assert_eq!(store.begin_load("digits", 2, &v2).unwrap(), 0);
        store.end_load("digits").unwrap();
        assert_eq!(store.begin_load("digits", 2, &v2).unwrap(), 0);
        // Two starts that never ended (the agent died), as a reopened
        // store sees them after each restart.
        let store = ModelStore::open(dir.path()).unwrap();
        assert_eq!(store.begin_load("digits", 2, &v2).unwrap(), 1);
        let store = ModelStore::open(dir.path()).unwrap();
        assert_eq!(
            store.begin_load("digits", 2, &v2).unwrap(),
            MAX_DIED_LOADING
        );
        // Another version, or the same number with other bytes, starts over.
        assert_eq!(store.begin_load("digits", 3, &v3).unwrap(), 0);
        assert_eq!(store.begin_load("digits", 3, &v2).unwrap(), 0);
        // A torn marker counts as none; ending twice is harmless.
        fs::write(dir.path().join("models/digits/loading"), b"{\"vers").unwrap();
        assert_eq!(store.begin_load("digits", 3, &v3).unwrap(), 0);
        store.end_load("digits").unwrap();
        store.end_load("digits").unwrap();
        assert!(!dir.path().join("models/digits/loading").exists());
        // The marker does not get in the way of installs or the active list.
        install_version(&store, 1);
        store.activate("digits", 1, None).unwrap();
        store.begin_load("digits", 2, &v2).unwrap();
        assert_eq!(store.active_models().unwrap().len(), 1);
    }
}
