//! `lhnet-proxy capture`: the capture-mode init container. It installs nftables rules in the
//! pod's network namespace so that connections arriving from outside the pod on Longhorn's
//! ports (8500, 8501) land on lhnet's (8510, 8511), while connections made inside the pod
//! (127.0.0.1, or the pod's own address) still reach the instance-manager: the rules sit on the
//! prerouting hook, which only sees packets that came in through an interface other than `lo`.
//!
//! The rules are one table, `inet lhnet_capture`, replaced whole in one `nft` transaction, so
//! running capture again leaves exactly one set. `nft` is shipped in the image.

use std::io::Write;
use std::process::{Command, Stdio};

/// The nftables table capture owns.
pub const TABLE: &str = "lhnet_capture";

/// A `FROM:TO` port redirect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    pub from: u16,
    pub to: u16,
}

/// Parses `8500:8510`.
pub fn parse_redirect(text: &str) -> Result<Redirect, String> {
    let (from, to) = text
        .split_once(':')
        .ok_or_else(|| format!("--redirect {text:?}: write FROM:TO, e.g. 8500:8510"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("--redirect {text:?}: {p:?} is not a port"))
    };
    let r = Redirect {
        from: port(from)?,
        to: port(to)?,
    };
    if r.from == r.to {
        return Err(format!("--redirect {text:?}: a port redirected to itself"));
    }
    Ok(r)
}

/// The nft script: create-if-missing, delete, define (one atomic transaction).
pub fn ruleset(redirects: &[Redirect]) -> String {
    let mut rules = String::new();
    for r in redirects {
        rules.push_str(&format!(
            "    iifname != \"lo\" tcp dport {} redirect to :{}\n",
            r.from, r.to
        ));
    }
    format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \x20 chain prerouting {{\n\
         \x20   type nat hook prerouting priority dstnat; policy accept;\n\
         {rules}\
         \x20 }}\n\
         }}\n"
    )
}

fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e} (the image ships nftables; is it on PATH?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft refused the rules ({}): {} (capture needs NET_ADMIN in the pod)",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Installs (or replaces) the redirect rules.
pub fn install(redirects: &[Redirect]) -> Result<(), String> {
    if redirects.is_empty() {
        return Err("nothing to capture: give at least one --redirect FROM:TO".into());
    }
    nft(&ruleset(redirects))
}

/// Removes the rules, if there are any.
pub fn remove() -> Result<(), String> {
    nft(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_parse_and_the_ruleset_replaces_itself() {
        assert_eq!(
            parse_redirect("8500:8510").unwrap(),
            Redirect {
                from: 8500,
                to: 8510
            }
        );
        for bad in ["8500", "8500:", "0:1", "x:1", "8500:8500", "70000:1"] {
            assert!(parse_redirect(bad).is_err(), "{bad}");
        }
        let script = ruleset(&[parse_redirect("8501:8511").unwrap()]);
        assert!(script.starts_with("table inet lhnet_capture\ndelete table inet lhnet_capture\n"));
        assert!(script.contains("iifname != \"lo\" tcp dport 8501 redirect to :8511"));
    }
}
