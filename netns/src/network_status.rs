//! Multus' `k8s.v1.cni.cncf.io/network-status` annotation, read from a downward-API file.
//!
//! The kubelet writes a downward-API `metadata.annotations` file as one `key="value"` line per
//! annotation, the value quoted the way Go's `strconv.Quote` does. A file that holds only the
//! annotation's value (a `fieldPath: metadata.annotations['…']` item) is raw JSON instead; both
//! are accepted.

use serde::Deserialize;

/// The current annotation name, and the one Multus wrote before v4 (Longhorn reads both).
pub const NETWORK_STATUS: &str = "k8s.v1.cni.cncf.io/network-status";
pub const NETWORKS_STATUS_DEPRECATED: &str = "k8s.v1.cni.cncf.io/networks-status";

/// One attachment in the annotation; only the keys Longhorn reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NetworkStatusEntry {
    pub name: String,
    #[serde(default)]
    pub interface: Option<String>,
    #[serde(default)]
    pub ips: Vec<String>,
}

/// Why a network-status file gave no entries.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworkStatusError {
    #[error(
        "no {NETWORK_STATUS} annotation in the file (is Multus installed and the pod attached?)"
    )]
    Missing,
    #[error("annotation line {line}: {reason}")]
    BadQuoting { line: usize, reason: String },
    #[error("annotation value is not network-status JSON: {0}")]
    BadJson(String),
}

/// Parses a downward-API annotations file (or a raw annotation value) into its entries.
pub fn parse_network_status(contents: &str) -> Result<Vec<NetworkStatusEntry>, NetworkStatusError> {
    let trimmed = contents.trim_start();
    let json = if trimmed.starts_with('[') {
        trimmed.to_string()
    } else {
        find_annotation(contents)?
    };
    serde_json::from_str(&json).map_err(|e| NetworkStatusError::BadJson(e.to_string()))
}

/// Longhorn's choice of storage IP: the entry whose `name` equals the network
/// (`<namespace>/<nad>`), its IPs sorted as strings, the first one.
pub fn pick_ip<'a>(
    entries: &'a [NetworkStatusEntry],
    network: &str,
) -> Option<(&'a NetworkStatusEntry, String)> {
    let entry = entries.iter().find(|e| e.name == network)?;
    let mut ips = entry.ips.clone();
    ips.sort();
    ips.into_iter().next().map(|ip| (entry, ip))
}

fn find_annotation(contents: &str) -> Result<String, NetworkStatusError> {
    let mut deprecated = None;
    for (idx, line) in contents.lines().enumerate() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key != NETWORK_STATUS && key != NETWORKS_STATUS_DEPRECATED {
            continue;
        }
        let value = unquote_go(value.trim()).map_err(|reason| NetworkStatusError::BadQuoting {
            line: idx + 1,
            reason,
        })?;
        if key == NETWORK_STATUS {
            return Ok(value);
        }
        deprecated = Some(value);
    }
    deprecated.ok_or(NetworkStatusError::Missing)
}

/// Undoes Go's `strconv.Quote`: `"…"` with `\n`, `\t`, `\"`, `\\`, `\xNN`, `\uNNNN`, `\UNNNNNNNN`.
fn unquote_go(quoted: &str) -> Result<String, String> {
    let inner = quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .ok_or_else(|| "value is not a double-quoted string".to_string())?;
    let mut out = String::with_capacity(inner.len());
    let mut bytes = Vec::new(); // pending \xNN bytes, which may form UTF-8 together
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            flush_bytes(&mut bytes, &mut out)?;
            out.push(c);
            continue;
        }
        let esc = chars.next().ok_or("dangling backslash at the end")?;
        let simple = match esc {
            'n' => Some('\n'),
            't' => Some('\t'),
            'r' => Some('\r'),
            'a' => Some('\u{7}'),
            'b' => Some('\u{8}'),
            'f' => Some('\u{c}'),
            'v' => Some('\u{b}'),
            '\\' => Some('\\'),
            '"' => Some('"'),
            '\'' => Some('\''),
            _ => None,
        };
        if let Some(ch) = simple {
            flush_bytes(&mut bytes, &mut out)?;
            out.push(ch);
            continue;
        }
        let digits = match esc {
            'x' => 2,
            'u' => 4,
            'U' => 8,
            other => return Err(format!("unknown escape \\{other}")),
        };
        let hex: String = chars.by_ref().take(digits).collect();
        if hex.len() != digits {
            return Err(format!("short escape \\{esc}{hex}"));
        }
        let value =
            u32::from_str_radix(&hex, 16).map_err(|_| format!("bad escape \\{esc}{hex}"))?;
        if esc == 'x' {
            bytes.push(value as u8);
        } else {
            flush_bytes(&mut bytes, &mut out)?;
            out.push(char::from_u32(value).ok_or_else(|| format!("bad code point \\{esc}{hex}"))?);
        }
    }
    flush_bytes(&mut bytes, &mut out)?;
    Ok(out)
}

fn flush_bytes(bytes: &mut Vec<u8>, out: &mut String) -> Result<(), String> {
    if bytes.is_empty() {
        return Ok(());
    }
    let s = std::str::from_utf8(bytes).map_err(|_| "\\x escapes are not UTF-8".to_string())?;
    out.push_str(s);
    bytes.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // The value as Multus writes it (4-space MarshalIndent, elements joined by ","), then quoted
    // by the kubelet into the downward-API file.
    const DOWNWARD_FILE: &str = concat!(
        "k8s.v1.cni.cncf.io/networks=\"[{\\\"namespace\\\": \\\"kube-system\\\", \\\"name\\\": \\\"demo-10-30-0-0\\\", \\\"interface\\\": \\\"lhnet1\\\"}]\"\n",
        "k8s.v1.cni.cncf.io/network-status=\"[{\\n    \\\"name\\\": \\\"cbr0\\\",\\n    \\\"interface\\\": \\\"eth0\\\",\\n    \\\"ips\\\": [\\n        \\\"10.42.1.23\\\"\\n    ],\\n    \\\"default\\\": true,\\n    \\\"dns\\\": {}\\n},{\\n    \\\"name\\\": \\\"kube-system/demo-10-30-0-0\\\",\\n    \\\"interface\\\": \\\"lhnet1\\\",\\n    \\\"ips\\\": [\\n        \\\"fd00::17\\\",\\n        \\\"10.30.4.17\\\"\\n    ],\\n    \\\"mac\\\": \\\"02:8c:41:7e:05:b2\\\",\\n    \\\"dns\\\": {}\\n}]\"\n",
        "longhorn.io/last-applied-tolerations=\"[]\"\n",
    );

    #[test]
    fn reads_downward_api_file() {
        let entries = parse_network_status(DOWNWARD_FILE).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].interface.as_deref(), Some("lhnet1"));
        let (entry, ip) = pick_ip(&entries, "kube-system/demo-10-30-0-0").unwrap();
        assert_eq!(entry.name, "kube-system/demo-10-30-0-0");
        // Longhorn sorts the IPs as strings: "10.30.4.17" < "fd00::17".
        assert_eq!(ip, "10.30.4.17");
        assert!(pick_ip(&entries, "kube-system/other").is_none());
    }

    #[test]
    fn reads_raw_value_and_deprecated_name() {
        let raw = r#"[{"name": "ns/net", "interface": "lhnet1", "ips": ["10.30.0.9"]}]"#;
        assert_eq!(
            pick_ip(&parse_network_status(raw).unwrap(), "ns/net")
                .unwrap()
                .1,
            "10.30.0.9"
        );
        let old = "k8s.v1.cni.cncf.io/networks-status=\"[{\\\"name\\\":\\\"ns/net\\\",\\\"ips\\\":[\\\"10.30.0.8\\\"]}]\"\n";
        assert_eq!(
            pick_ip(&parse_network_status(old).unwrap(), "ns/net")
                .unwrap()
                .1,
            "10.30.0.8"
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            parse_network_status("a=\"b\"\n"),
            Err(NetworkStatusError::Missing)
        );
        let bad = "k8s.v1.cni.cncf.io/network-status=[oops\n";
        assert!(matches!(
            parse_network_status(bad),
            Err(NetworkStatusError::BadQuoting { line: 1, .. })
        ));
        let not_json = "k8s.v1.cni.cncf.io/network-status=\"{nope\"\n";
        assert!(matches!(
            parse_network_status(not_json),
            Err(NetworkStatusError::BadJson(_))
        ));
    }

    #[test]
    fn unquotes_go_escapes() {
        assert_eq!(unquote_go(r#""a\tb\u00e9\xc3\xa9\"""#).unwrap(), "a\tbéé\"");
        assert!(unquote_go(r#""\q""#).is_err());
        assert!(unquote_go(r#""\u12""#).is_err());
    }
}
