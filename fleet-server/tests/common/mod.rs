//! What the fleet server's integration tests share.

/// A URL whose connections use a new, empty PostgreSQL schema, named with
/// `label`: `EDGEFLEET_TEST_POSTGRES_URL` (`.ci/run` sets it; default
/// `postgres://postgres@127.0.0.1:5432/test`). Panics, saying so, when
/// PostgreSQL is unreachable.
pub async fn fresh_postgres_schema(label: &str) -> String {
    let url = std::env::var("EDGEFLEET_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!(
        "edgefleet_test_{}_{}_{label}",
        std::process::id(),
        edgefleet_shared::unix_now()
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("no PostgreSQL at {url} ({e}): start one or set EDGEFLEET_TEST_POSTGRES_URL")
        });
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap_or_else(|e| panic!("cannot create schema {schema}: {e}"));
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}
