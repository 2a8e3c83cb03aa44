//! `azblob://CONTAINER@ENDPOINT_SUFFIX/PATH` (or `azblob://CONTAINER/PATH`) through Apache
//! Arrow's `object_store` Azure client, as Longhorn's azblob driver reads it (spec §3 for the
//! env keys; longhorn/backupstore `azblob/`):
//! - the container is the URL's user part, the host part (port included) the endpoint suffix
//!   (`core.windows.net` when the URL has none: Longhorn's own no-`@` form would build the
//!   host `ACCOUNT.blob.` and never resolve); the path, leading `/` trimmed, is the prefix;
//! - `AZBLOB_ACCOUNT_NAME` and `AZBLOB_ACCOUNT_KEY` (a shared key; both or neither, as Longhorn
//!   checks, and lhnet needs both: it reads no managed identity and no SAS);
//! - `AZBLOB_ENDPOINT` (Azurite and friends): path-style, `ENDPOINT/ACCOUNT`; otherwise
//!   `https://ACCOUNT.blob.SUFFIX`;
//! - `AZBLOB_CERT` (PEM added to the system roots), `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`.
//!
//! Empty values are unset, as the manager sends every key. The objects are [`ObjectDriver`]'s,
//! the HTTP client (destination policy, bounded answers) [`super::http`]'s.

use std::collections::HashMap;
use std::sync::Arc;

use object_store::azure::MicrosoftAzureBuilder;
use object_store::ObjectStore;

use super::endpoints::EndpointPolicy;
use super::http::{check_endpoint, check_proxies, Connector};
use super::object::{setting, ObjectDriver};

/// Azure's public endpoint suffix.
const DEFAULT_SUFFIX: &str = "core.windows.net";

/// The parts of an `azblob://` URL.
#[derive(Debug, PartialEq, Eq)]
pub struct AzblobUrl {
    pub container: String,
    /// The endpoint suffix (`core.windows.net`, `core.chinacloudapi.cn`, …), if written.
    pub suffix: Option<String>,
    /// Without its leading `/`s, as written otherwise (a trailing `/` is kept).
    pub path: String,
}

impl AzblobUrl {
    pub fn parse(url: &str) -> Result<AzblobUrl, String> {
        let form = || {
            format!(
                "backup target {url}: write azblob://CONTAINER@ENDPOINT_SUFFIX/PATH or azblob://CONTAINER/PATH (the path may be /)"
            )
        };
        let rest = url.strip_prefix("azblob://").ok_or_else(form)?;
        let (authority, path) = rest.split_once('/').ok_or_else(form)?;
        let (container, suffix) = match authority.split_once('@') {
            Some((c, s)) => (c, (!s.is_empty()).then(|| s.to_string())),
            None => (authority, None),
        };
        if container.is_empty() {
            return Err(form());
        }
        let ok = |s: &str, extra: &[char]| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || extra.contains(&c))
        };
        if !ok(container, &[]) {
            return Err(format!(
                "backup target {url}: a container name is letters, digits and '-'"
            ));
        }
        if suffix.as_deref().is_some_and(|s| !ok(s, &['.', ':'])) {
            return Err(format!(
                "backup target {url}: the endpoint suffix is a host name (core.windows.net)"
            ));
        }
        Ok(AzblobUrl {
            container: container.to_string(),
            suffix,
            path: path.trim_start_matches('/').to_string(),
        })
    }

    /// Longhorn's `GetURL()`: `azblob://container[@suffix]/<path>`.
    pub fn normalised(&self) -> String {
        match &self.suffix {
            Some(s) => format!("azblob://{}@{s}/{}", self.container, self.path),
            None => format!("azblob://{}/{}", self.container, self.path),
        }
    }
}

/// Opens an `azblob://` target.
pub fn open(
    url: &str,
    credentials: &HashMap<String, String>,
    policy: &Arc<EndpointPolicy>,
) -> Result<ObjectDriver, String> {
    let parsed = AzblobUrl::parse(url)?;
    ObjectDriver::open(
        "azblob",
        "Azure",
        &parsed.normalised(),
        credentials,
        policy,
        &parsed.path,
        "",
        || {
            build_store(url, &parsed, credentials, policy)
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        },
    )
}

fn build_store(
    url: &str,
    parsed: &AzblobUrl,
    credentials: &HashMap<String, String>,
    policy: &Arc<EndpointPolicy>,
) -> Result<object_store::azure::MicrosoftAzure, String> {
    let (account, key) = match (
        setting(credentials, "AZBLOB_ACCOUNT_NAME"),
        setting(credentials, "AZBLOB_ACCOUNT_KEY"),
    ) {
        (Some(a), Some(k)) => (a, k),
        (None, _) => {
            return Err(format!(
                "backup target {url}: azure Blob Storage credential account name not found (AZBLOB_ACCOUNT_NAME in envs)"
            ))
        }
        (_, None) => {
            return Err(format!(
                "backup target {url}: azure Blob Storage credential account key not found (AZBLOB_ACCOUNT_KEY in envs)"
            ))
        }
    };
    if !account.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "backup target {url}: AZBLOB_ACCOUNT_NAME {account:?} is not a storage account name (letters and digits)"
        ));
    }
    let (key_name, service) = match setting(credentials, "AZBLOB_ENDPOINT") {
        Some(endpoint) => {
            let endpoint = endpoint.trim_end_matches('/');
            check_endpoint(endpoint, "the account goes in AZBLOB_ACCOUNT_NAME").map_err(|why| {
                format!("backup target {url}: AZBLOB_ENDPOINT {endpoint:?} {why}; write http(s)://HOST[:PORT]")
            })?;
            ("AZBLOB_ENDPOINT", format!("{endpoint}/{account}"))
        }
        None => (
            "the target URL's endpoint",
            format!(
                "https://{account}.blob.{}",
                parsed.suffix.as_deref().unwrap_or(DEFAULT_SUFFIX)
            ),
        ),
    };
    check_proxies(url, credentials)?;
    let builder = MicrosoftAzureBuilder::new()
        .with_account(account)
        .with_access_key(key)
        .with_credential_type("access_key")
        .with_container_name(&parsed.container)
        .with_endpoint(service.clone())
        .with_retry(super::http::retry())
        .with_client_options(super::http::client_options())
        .with_http_connector(Connector::new(
            url,
            credentials,
            policy,
            "AZBLOB_CERT",
            false,
        )?);
    super::http::check_destinations(url, credentials, policy, (key_name, &service))?;
    builder
        .build()
        .map_err(|e| format!("backup target {url}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_as_longhorn_reads_them() {
        let u = AzblobUrl::parse("azblob://backups@core.windows.net/cluster-a/").unwrap();
        assert_eq!(
            u,
            AzblobUrl {
                container: "backups".into(),
                suffix: Some("core.windows.net".into()),
                path: "cluster-a/".into()
            }
        );
        assert_eq!(
            u.normalised(),
            "azblob://backups@core.windows.net/cluster-a/"
        );
        let short = AzblobUrl::parse("azblob://backups//p").unwrap();
        assert_eq!((short.suffix, short.path.as_str()), (None, "p"));
        assert!(AzblobUrl::parse("azblob://backups@core.windows.net")
            .unwrap_err()
            .contains("CONTAINER@ENDPOINT_SUFFIX/PATH"));
        assert!(AzblobUrl::parse("azblob://@x/p").is_err());
        assert!(AzblobUrl::parse("azblob://a b@x/p").is_err());
        assert!(AzblobUrl::parse("azblob://c@x y/p").is_err());
    }

    #[test]
    fn settings_are_checked_before_any_request() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let policy = Arc::new(EndpointPolicy::default());
        let creds = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let url = "azblob://c@core.windows.net/p";
        let err = open(url, &creds(&[("AZBLOB_ACCOUNT_KEY", "a2V5")]), &policy).unwrap_err();
        assert!(err.contains("account name not found"), "{err}");
        let err = open(url, &creds(&[("AZBLOB_ACCOUNT_NAME", "acct")]), &policy).unwrap_err();
        assert!(err.contains("account key not found"), "{err}");
        let with = |extra: (&str, &str)| {
            let mut c = creds(&[
                ("AZBLOB_ACCOUNT_NAME", "acct"),
                ("AZBLOB_ACCOUNT_KEY", "a2V5"),
            ]);
            c.insert(extra.0.into(), extra.1.into());
            open(url, &c, &policy).map(|_| ())
        };
        let err = with(("AZBLOB_ENDPOINT", "http://h:10000/acct")).unwrap_err();
        assert!(err.contains("has a path"), "{err}");
        let err = with(("AZBLOB_ENDPOINT", "http://acct@h:10000")).unwrap_err();
        assert!(err.contains("AZBLOB_ACCOUNT_NAME"), "{err}");
        let err = with(("AZBLOB_CERT", "-----BEGIN CERTIFICATE-----\nx\n")).unwrap_err();
        assert!(err.contains("AZBLOB_CERT"), "{err}");
        // The policy applies: the emulator's loopback address is refused unless listed.
        let err = with(("AZBLOB_ENDPOINT", "http://127.0.0.1:10000")).unwrap_err();
        assert!(
            err.contains("AZBLOB_ENDPOINT 127.0.0.1:10000 is") && err.contains("loopback"),
            "{err}"
        );
        let err = with(("AZBLOB_ACCOUNT_NAME", "no-dashes")).unwrap_err();
        assert!(err.contains("storage account name"), "{err}");
    }
}
