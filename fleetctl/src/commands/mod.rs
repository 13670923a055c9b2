//! One module per command group, as `fleetctl --help` lists them. Each
//! takes its parsed arguments and the [`crate::Context`], calls the API
//! through the typed client and prints the answer.

pub mod agent;
pub mod audit;
pub mod broker;
pub mod deploy;
pub mod devices;
pub mod enroll;
pub mod flash;
pub mod keys;
pub mod models;
pub mod quality;
pub mod reference;
pub mod rollout;
pub mod tokens;

use std::collections::BTreeMap;

use futures_util::StreamExt;

use crate::failure::{usage, Failure};

/// A file streamed as a request body, with a progress bar saying
/// `message` (hidden when `hidden`, for JSON output). Call
/// `finish_and_clear` on the bar once the request is done.
pub fn upload_body(
    file: tokio::fs::File,
    size: u64,
    message: String,
    hidden: bool,
) -> (reqwest::Body, indicatif::ProgressBar) {
    let bar = if hidden {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(size)
    };
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .expect("the progress bar template is a valid constant")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(message);
    let progress = bar.clone();
    let stream = tokio_util::io::ReaderStream::new(file).map(move |chunk| {
        if let Ok(c) = &chunk {
            progress.inc(c.len() as u64);
        }
        chunk
    });
    (reqwest::Body::wrap_stream(stream), bar)
}

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
