//! Queries whose shape depends on their arguments, built once for both
//! backends: a device listing's filter, paging and order. Each backend
//! supplies its [`Dialect`] (placeholders, how to match a tag in the tags
//! JSON) and binds the [`SqlValue`]s with its driver.

use super::rows::DEVICE_COLUMNS;
use super::{DeviceFilter, Page};

/// A value bound to a placeholder of a built query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SqlValue {
    Text(String),
    Int(i64),
    /// A true/false column's value (SQLite binds 0 or 1).
    Flag(bool),
}

/// How one database spells what [`device_query`] needs.
pub(crate) trait Dialect {
    /// The placeholder of the `n`th bound value (1-based).
    fn placeholder(n: usize) -> String;

    /// A condition true when the tags JSON has `key` with the value bound
    /// at `value` (`key` is a placeholder bound to [`Self::tag_key`]).
    fn tag_equals(key: &str, value: &str) -> String;

    /// The value bound for a tag key in [`Self::tag_equals`].
    fn tag_key(key: &str) -> String;
}

/// The query listing the devices that match `filter` (all its tags, its
/// hardware class and online state if given), ids after `filter.after`, by
/// id, at most `filter.limit`; with its bound values in placeholder order.
pub(crate) fn device_query<D: Dialect>(filter: &DeviceFilter) -> (String, Vec<SqlValue>) {
    let mut args = vec![SqlValue::Text(filter.after.clone().unwrap_or_default())];
    let mut sql = format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE id > {}",
        D::placeholder(1)
    );
    if let Some(hardware) = &filter.hardware {
        args.push(SqlValue::Text(hardware.clone()));
        sql += &format!(" AND hardware = {}", D::placeholder(args.len()));
    }
    if let Some(online) = filter.online {
        args.push(SqlValue::Flag(online));
        sql += &format!(" AND online = {}", D::placeholder(args.len()));
    }
    for (key, value) in &filter.tags {
        args.push(SqlValue::Text(D::tag_key(key)));
        args.push(SqlValue::Text(value.clone()));
        let condition = D::tag_equals(&D::placeholder(args.len() - 1), &D::placeholder(args.len()));
        sql += &format!(" AND {condition}");
    }
    args.push(SqlValue::Int(i64::from(filter.limit)));
    sql += &format!(" ORDER BY id LIMIT {}", D::placeholder(args.len()));
    (sql, args)
}

/// A page's bounds as bound values: the sequence number to read after and
/// the row limit.
pub(crate) fn page_bounds(page: &Page) -> (i64, i64) {
    (
        super::rows::stored(page.after_seq.unwrap_or(0)),
        i64::from(page.limit),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Placeholders `:n`, tags matched by a made-up function.
    struct Plain;

    impl Dialect for Plain {
        fn placeholder(n: usize) -> String {
            format!(":{n}")
        }
        fn tag_equals(key: &str, value: &str) -> String {
            format!("tag(tags, {key}) = {value}")
        }
        fn tag_key(key: &str) -> String {
            format!("<{key}>")
        }
    }

    #[test]
    fn an_empty_filter_pages_by_id() {
        let (sql, args) = device_query::<Plain>(&DeviceFilter {
            limit: 5,
            ..Default::default()
        });
        assert!(
            sql.ends_with("FROM devices WHERE id > :1 ORDER BY id LIMIT :2"),
            "{sql}"
        );
        assert_eq!(args, [SqlValue::Text(String::new()), SqlValue::Int(5)]);
    }

    #[test]
    fn every_condition_binds_its_values_in_placeholder_order() {
        let (sql, args) = device_query::<Plain>(&DeviceFilter {
            tags: vec![("site".into(), "rome".into()), ("room".into(), "1".into())],
            hardware: Some("rpi4".into()),
            online: Some(true),
            after: Some("b".into()),
            limit: 10,
        });
        assert!(
            sql.ends_with(
                "WHERE id > :1 AND hardware = :2 AND online = :3 \
                 AND tag(tags, :4) = :5 AND tag(tags, :6) = :7 ORDER BY id LIMIT :8"
            ),
            "{sql}"
        );
        let text = |s: &str| SqlValue::Text(s.into());
        assert_eq!(
            args,
            [
                text("b"),
                text("rpi4"),
                SqlValue::Flag(true),
                text("<site>"),
                text("rome"),
                text("<room>"),
                text("1"),
                SqlValue::Int(10),
            ]
        );
    }

    #[test]
    fn page_bounds_start_at_the_beginning() {
        let page = Page {
            after_seq: None,
            limit: 3,
        };
        assert_eq!(page_bounds(&page), (0, 3));
        let page = Page {
            after_seq: Some(7),
            limit: 3,
        };
        assert_eq!(page_bounds(&page), (7, 3));
    }
}
