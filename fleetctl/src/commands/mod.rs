//! One module per command group, as `fleetctl --help` lists them. Each
//! takes its parsed arguments and the [`crate::Context`], calls the API
//! through the typed client and prints the answer.

pub mod audit;
pub mod broker;
pub mod deploy;
pub mod devices;
pub mod enroll;
pub mod flash;
pub mod keys;
pub mod models;
pub mod rollout;
pub mod tokens;

use std::collections::BTreeMap;

use crate::failure::{usage, Failure};

/// KEY=VALUE arguments (`--tag`) as a map; anything without `=` is a
/// usage error naming it.
pub fn parse_tags(tags: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    tags.iter()
        .map(|t| {
            t.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| usage(anyhow::anyhow!("tag {t:?} must be KEY=VALUE")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::Exit;

    #[test]
    fn tags_split_at_the_first_equals_sign() {
        let tags = parse_tags(&["site=lyon".into(), "expr=a=b".into()]).expect("valid tags");
        assert_eq!(tags["site"], "lyon");
        assert_eq!(tags["expr"], "a=b");
        let bad = parse_tags(&["site".into()]).expect_err("no = is refused");
        assert_eq!(bad.exit, Exit::Usage);
        assert!(bad.error.to_string().contains("\"site\" must be KEY=VALUE"));
    }
}
