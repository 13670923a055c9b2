//! MQTT broker addresses as both sides write them: `mqtt://host:port`, or
//! `mqtts://host:port` for MQTT over TLS.

/// Whether `url` asks for TLS (`mqtts://` or `ssl://`).
pub fn is_tls(url: &str) -> bool {
    url.starts_with("mqtts://") || url.starts_with("ssl://")
}

/// Parses `mqtt://host:port` (also `tcp://`; the port defaults to 1883)
/// or `mqtts://host:port` (also `ssl://`; the port defaults to 8883); IPv6
/// hosts go in brackets. The error says what is wrong.
pub fn parse(url: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| {
        format!("broker url {url:?} {why}; expected mqtt://host:port or mqtts://host:port")
    };
    let (rest, default_port) = if let Some(rest) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (rest, 1883)
    } else if let Some(rest) = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("ssl://"))
    {
        (rest, 8883)
    } else {
        return Err(bad("has an unsupported scheme"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':').filter(|(h, _)| !h.ends_with(':')) {
        Some((h, p)) if !rest.ends_with(']') => {
            (h, p.parse::<u16>().map_err(|_| bad("has an invalid port"))?)
        }
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    Ok((host.to_string(), port))
}

/// Where Debian, Raspberry Pi OS, Ubuntu and Alpine keep the system's
/// trusted certificate authorities.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The PEM certificate authorities an `mqtts://` connection trusts: `ca`
/// (the fleet's own CA, from the configuration) when given, else the
/// system's bundle.
pub fn trusted_cas(ca: Option<Vec<u8>>) -> Result<Vec<u8>, String> {
    match ca {
        Some(pem) if !pem.is_empty() => Ok(pem),
        _ => std::fs::read(SYSTEM_CA_BUNDLE).map_err(|e| {
            format!("mqtts:// needs a CA certificate: none configured (ca_file or ca_pem), and the system bundle {SYSTEM_CA_BUNDLE} is unreadable: {e}")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::{is_tls, parse};

    #[test]
    fn urls() {
        assert_eq!(parse("mqtt://h").unwrap(), ("h".into(), 1883));
        assert_eq!(parse("mqtt://h:1884/").unwrap(), ("h".into(), 1884));
        assert_eq!(parse("tcp://[::1]:9").unwrap(), ("::1".into(), 9));
        assert_eq!(parse("mqtt://[::1]").unwrap(), ("::1".into(), 1883));
        assert!(parse("http://h:1").unwrap_err().contains("scheme"));
        assert!(parse("mqtt://h:x").unwrap_err().contains("port"));
        assert!(parse("mqtt://:1").unwrap_err().contains("no host"));
        assert_eq!(parse("mqtts://h").unwrap(), ("h".into(), 8883));
        assert_eq!(parse("ssl://h:8884").unwrap(), ("h".into(), 8884));
        assert!(is_tls("mqtts://h") && is_tls("ssl://h") && !is_tls("mqtt://h"));
    }
}
