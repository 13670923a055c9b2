//! The devices' endpoints: list (by tags, hardware class, online state,
//! paged), show, tag, and read what a device reported (update events,
//! telemetry, inference results) and the desired state signed for it.
//! Enrolling, revoking and keys are [`super::enrollment`]'s.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::Deserialize;

use super::access::{audit, detail};
use super::types::{
    DeviceDetail, DeviceResults, DeviceTelemetry, ErrorBody, EventRecord, SignedEnvelope,
    StreamedRecord, Tags,
};
use super::{parse_body, ApiError, ApiResult};
use crate::auth;
use crate::fleet::Fleet;
use crate::store::{self, DeviceRecord};

/// `GET /api/v1/devices?tag=K=V&hardware=H&online=true&after=ID&limit=N`:
/// devices with all the given tags (repeat `tag`), by id; page with
/// `after` = the last id of the previous page.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(("tag" = Option<Vec<String>>, Query, description = "KEY=VALUE; repeat to require several"), ("hardware" = Option<String>, Query), ("online" = Option<bool>, Query), ("after" = Option<String>, Query, description = "ids after this one (paging)"), ("limit" = Option<u32>, Query, description = "1 to 10000, default 1000")), responses((status = 200, body = [DeviceRecord]), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
pub(super) async fn list_devices(
    State(fleet): State<Fleet>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Json<Vec<DeviceRecord>>> {
    let filter = device_filter(query.as_deref().unwrap_or(""))?;
    Ok(Json(fleet.store.find_devices(&filter).await?))
}

/// The filter a device listing's query string asks for.
fn device_filter(query: &str) -> ApiResult<store::DeviceFilter> {
    let mut filter = store::DeviceFilter {
        limit: 1000,
        ..Default::default()
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "tag" => {
                let (k, v) = value.split_once('=').ok_or_else(|| {
                    ApiError::BadRequest(format!("tag {value:?} must be KEY=VALUE"))
                })?;
                check_tag(k, v)?;
                filter.tags.push((k.to_string(), v.to_string()));
            }
            "hardware" => filter.hardware = Some(value.into_owned()),
            "online" => {
                filter.online = Some(value.parse().map_err(|_| {
                    ApiError::BadRequest(format!("online must be true or false, not {value:?}"))
                })?)
            }
            "after" => filter.after = Some(value.into_owned()),
            "limit" => {
                filter.limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=10_000).contains(l))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("limit must be 1 to 10000, not {value:?}"))
                    })?
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?} (use tag, hardware, online, after, limit)"
                )))
            }
        }
    }
    Ok(filter)
}

/// Tag keys and values: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub(super) fn check_tag(key: &str, value: &str) -> ApiResult<()> {
    let ok = |s: &str| {
        (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if ok(key) && ok(value) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "tag {key:?}={value:?}: keys and values are 1 to 64 of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// A hardware class: what a tag value may be.
pub(super) fn check_hardware(hardware: &str) -> ApiResult<()> {
    check_tag("hardware", hardware).map_err(|_| {
        ApiError::BadRequest(format!(
            "hardware {hardware:?} must be 1 to 64 of A-Z a-z 0-9 . _ -"
        ))
    })
}

/// A device filter requiring all of `tags` (each checked).
pub(super) fn tag_filter(tags: &BTreeMap<String, String>) -> ApiResult<store::DeviceFilter> {
    let mut filter = store::DeviceFilter::default();
    for (k, v) in tags {
        check_tag(k, v)?;
        filter.tags.push((k.clone(), v.clone()));
    }
    Ok(filter)
}

/// `GET /api/v1/devices/{id}`: the device, and what the server refused of
/// its messages.
#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "device id")), responses((status = 200, body = DeviceDetail), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn get_device(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeviceDetail>> {
    let device = fleet
        .store
        .get_device(&id)
        .await?
        .ok_or_else(|| ApiError::UnknownDevice(id.clone()))?;
    Ok(Json(DeviceDetail {
        device,
        rejected_messages: fleet.device_keys.rejections(&id).map(Into::into),
    }))
}

/// `PUT /api/v1/devices/{id}/tags`: replaces a device's tags.
#[utoipa::path(put, path = "/api/v1/devices/{id}/tags", tag = "devices", params(("id" = String, Path, description = "device id")), request_body = Tags, responses((status = 200, body = DeviceRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn put_tags(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<DeviceRecord>> {
    let Tags(tags) = parse_body(&body, "malformed tags (expected {\"key\": \"value\", ...})")?;
    for (k, v) in &tags {
        check_tag(k, v)?;
    }
    let device = fleet
        .store
        .set_tags(&id, &tags)
        .await?
        .ok_or_else(|| ApiError::UnknownDevice(id.clone()))?;
    // Newly in an active rollout's selection: it joins.
    fleet.rollouts.on_join(&device).await;
    fleet.rollouts.flush().await?;
    audit(&fleet, &op, "device.tags", id, detail(&tags)).await;
    Ok(Json(device))
}

/// The query of a device's events.
#[derive(Deserialize)]
pub(super) struct EventsQuery {
    limit: Option<u32>,
}

/// `GET /api/v1/devices/{id}/events`: a device's latest update events.
#[utoipa::path(get, path = "/api/v1/devices/{id}/events", tag = "devices", params(("id" = String, Path, description = "device id"), ("limit" = Option<u32>, Query)), responses((status = 200, body = [EventRecord]), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
pub(super) async fn device_events(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Json<Vec<EventRecord>>> {
    let limit = q.limit.unwrap_or(100).min(1000);
    Ok(Json(fleet.store.events_for_device(&id, limit).await?))
}

/// The query of a page of one of a device's streams.
#[derive(Debug, Deserialize)]
pub(super) struct StreamQuery {
    /// Only records with a sequence number above this one (for paging).
    after_seq: Option<u64>,
    limit: Option<u32>,
    /// Results only: one model's.
    model: Option<String>,
}

impl StreamQuery {
    fn page(&self) -> store::Page {
        store::Page {
            after_seq: self.after_seq,
            limit: self.limit.unwrap_or(500).clamp(1, 5000),
        }
    }
}

/// The records of a page of one of a device's streams; `None` (an unknown
/// device) is a 404.
fn stream_records(
    id: &str,
    rows: Option<Vec<serde_json::Value>>,
) -> ApiResult<Vec<StreamedRecord>> {
    let rows = rows.ok_or_else(|| ApiError::UnknownDevice(id.to_string()))?;
    rows.into_iter()
        .map(|row| {
            serde_json::from_value(row).map_err(|e| {
                ApiError::Internal(format!(
                    "a stored record of device {id:?} is unreadable: {e}"
                ))
            })
        })
        .collect()
}

/// Recent telemetry of a device, oldest first (`after_seq` pages forward).
#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry", tag = "devices", params(("id" = String, Path, description = "device id"), ("after_seq" = Option<u64>, Query), ("limit" = Option<u32>, Query)), responses((status = 200, description = "device_id and telemetry: samples as devices sent them, plus received_at", body = DeviceTelemetry), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn device_telemetry(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
    Query(q): Query<StreamQuery>,
) -> ApiResult<Json<DeviceTelemetry>> {
    let rows = fleet.store.telemetry_for_device(&id, &q.page()).await?;
    let telemetry = stream_records(&id, rows)?;
    Ok(Json(DeviceTelemetry {
        device_id: id,
        telemetry,
    }))
}

/// Uploaded inference results of a device, oldest first.
#[utoipa::path(get, path = "/api/v1/devices/{id}/results", tag = "devices", params(("id" = String, Path, description = "device id"), ("after_seq" = Option<u64>, Query), ("limit" = Option<u32>, Query), ("model" = Option<String>, Query)), responses((status = 200, description = "device_id and results: uploaded inference results, plus received_at", body = DeviceResults), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn device_results(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
    Query(q): Query<StreamQuery>,
) -> ApiResult<Json<DeviceResults>> {
    let rows = fleet
        .store
        .results_for_device(&id, q.model.as_deref(), &q.page())
        .await?;
    let results = stream_records(&id, rows)?;
    Ok(Json(DeviceResults {
        device_id: id,
        results,
    }))
}

/// `GET /api/v1/devices/{id}/desired`: the desired state last signed for
/// the device.
#[utoipa::path(get, path = "/api/v1/devices/{id}/desired", tag = "devices", params(("id" = String, Path, description = "device id")), responses((status = 200, description = "the signed desired-state document", body = SignedEnvelope), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn device_desired(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
) -> ApiResult<Json<SignedEnvelope>> {
    let doc = fleet
        .store
        .desired_json(&id)
        .await?
        .ok_or_else(|| ApiError::NoDesiredState(id.clone()))?;
    let envelope = serde_json::from_slice(doc.as_ref()).map_err(|e| {
        ApiError::Internal(format!(
            "the stored desired state of device {id:?} is unreadable: {e}"
        ))
    })?;
    Ok(Json(envelope))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_queries_become_filters() {
        let f = device_filter(
            "tag=site%3Dnorth&tag=role=cam&hardware=rpi4&online=true&after=cam-9&limit=50",
        )
        .unwrap();
        assert_eq!(
            f.tags,
            vec![
                ("site".to_string(), "north".to_string()),
                ("role".to_string(), "cam".to_string())
            ]
        );
        assert_eq!(f.hardware.as_deref(), Some("rpi4"));
        assert_eq!(f.online, Some(true));
        assert_eq!(f.after.as_deref(), Some("cam-9"));
        assert_eq!(f.limit, 50);
        assert_eq!(device_filter("").unwrap().limit, 1000);
        for (bad, says) in [
            ("tag=site", "KEY=VALUE"),
            ("tag=a%20b=c", "1 to 64"),
            ("online=yes", "true or false"),
            ("limit=0", "1 to 10000"),
            ("limit=10001", "1 to 10000"),
            ("colour=red", "unknown query parameter \"colour\""),
        ] {
            let err = device_filter(bad).unwrap_err();
            assert!(matches!(err, ApiError::BadRequest(_)), "{bad}");
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn tags_are_short_and_plain() {
        assert!(check_tag("site", "north-1.a_b").is_ok());
        assert!(check_tag("", "x").is_err());
        assert!(check_tag("k", &"x".repeat(65)).is_err());
        assert!(check_tag("k", "a/b").is_err());
        assert!(check_hardware("rpi4").is_ok());
        assert!(check_hardware("r p i")
            .unwrap_err()
            .to_string()
            .contains("\"r p i\""));
    }

    #[test]
    fn stored_stream_rows_keep_their_fields() {
        let row = serde_json::json!({
            "schema": 1, "device_id": "cam-1", "seq": 7, "at": 100, "received_at": 101,
            "health": {"cpu_percent": 3.5}
        });
        let records = stream_records("cam-1", Some(vec![row.clone()])).unwrap();
        assert_eq!(records[0].seq, 7);
        assert_eq!(records[0].received_at, 101);
        assert_eq!(serde_json::to_value(&records[0]).unwrap(), row);
        assert!(matches!(
            stream_records("cam-2", None),
            Err(ApiError::UnknownDevice(id)) if id == "cam-2"
        ));
    }
}
