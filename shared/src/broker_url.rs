//! MQTT broker addresses as both sides write them: `mqtt://host:port`.

/// Parses `mqtt://host:port` (also `tcp://`; the port defaults to 1883;
/// IPv6 hosts go in brackets). The error says what is wrong.
pub fn parse(url: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| format!("broker url {url:?} {why}; expected mqtt://host:port");
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| bad("has an unsupported scheme"))?
        .trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':').filter(|(h, _)| !h.ends_with(':')) {
        Some((h, p)) if !rest.ends_with(']') => {
            (h, p.parse::<u16>().map_err(|_| bad("has an invalid port"))?)
        }
        _ => (rest, 1883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn urls() {
        assert_eq!(parse("mqtt://h").unwrap(), ("h".into(), 1883));
        assert_eq!(parse("mqtt://h:1884/").unwrap(), ("h".into(), 1884));
        assert_eq!(parse("tcp://[::1]:9").unwrap(), ("::1".into(), 9));
        assert_eq!(parse("mqtt://[::1]").unwrap(), ("::1".into(), 1883));
        assert!(parse("http://h:1").unwrap_err().contains("scheme"));
        assert!(parse("mqtt://h:x").unwrap_err().contains("port"));
        assert!(parse("mqtt://:1").unwrap_err().contains("no host"));
    }
}
