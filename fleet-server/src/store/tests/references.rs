//! The store suite's tests of drift reference profiles, on both backends
//! like the rest: set, replace, read, list, refused for a model version
//! that does not exist, and gone with the version.

use super::*;

async fn references_are_set_replaced_listed_and_deleted_with_the_version(f: Fixture) {
    let s = &f.store;
    let err = s.set_reference("m", 1, "{}", 5).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    assert!(err.to_string().contains("m"), "{err}");
    s.add_model(&model("m", 1)).await.unwrap();
    s.add_model(&model("m", 2)).await.unwrap();
    s.add_model(&model("other", 1)).await.unwrap();
    assert_eq!(s.get_reference("m", 1).await.unwrap(), None);
    s.set_reference("m", 1, r#"{"a":1}"#, 5).await.unwrap();
    s.set_reference("other", 1, r#"{"o":1}"#, 5).await.unwrap();
    s.set_reference("m", 1, r#"{"a":2}"#, 6).await.unwrap();
    assert_eq!(
        s.get_reference("m", 1).await.unwrap().as_deref(),
        Some(r#"{"a":2}"#)
    );
    assert_eq!(s.get_reference("m", 2).await.unwrap(), None);
    assert_eq!(
        s.list_references().await.unwrap(),
        vec![
            ("m".to_string(), 1, r#"{"a":2}"#.to_string()),
            ("other".to_string(), 1, r#"{"o":1}"#.to_string()),
        ]
    );
    // Deleting the version deletes its reference: a version pushed again
    // under the same number does not inherit it.
    s.delete_model("m", 1).await.unwrap();
    assert_eq!(s.get_reference("m", 1).await.unwrap(), None);
    s.add_model(&model("m", 1)).await.unwrap();
    assert_eq!(s.get_reference("m", 1).await.unwrap(), None);
    assert_eq!(s.list_references().await.unwrap().len(), 1);
}

suite!(references_are_set_replaced_listed_and_deleted_with_the_version);
