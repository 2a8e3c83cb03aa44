//! `s3://BUCKET@REGION/PATH` (or `s3://BUCKET/PATH`) through Apache Arrow's `object_store`.
//!
//! Credentials and settings come from the call's `envs` (spec §2.5), never from the process
//! environment: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_REGION`
//! (when the URL has no `@REGION`; default `us-east-1`), `AWS_ENDPOINTS` (MinIO and friends;
//! path-style unless `VIRTUAL_HOSTED_STYLE=true`), `AWS_CERT` (PEM added to the system roots),
//! `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`. Empty values count as unset, as the manager sends every
//! key. Without keys the store falls back to the instance metadata service (IAM roles), as the
//! AWS SDK in Longhorn does, when `backup_target.instance_metadata` allows it.
//!
//! The objects themselves are [`ObjectDriver`]'s, the HTTP client is [`super::http`]'s. Each
//! request has a 30 s timeout and up to 3 retries (Longhorn's `MaxRetries`).

use std::collections::HashMap;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::ObjectStore;

use super::endpoints::{EndpointPolicy, REFUSED};
use super::http::{check_endpoint, check_proxies, Connector};
use super::object::{setting, ObjectDriver};

/// The parts of an `s3://` URL.
#[derive(Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub region: Option<String>,
    /// Without its leading `/` (Longhorn trims only that one); empty for the bucket's root.
    pub path: String,
}

impl S3Url {
    pub fn parse(url: &str) -> Result<S3Url, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("backup target {url} is not s3://"))?;
        let (authority, path) = rest.split_once('/').ok_or_else(|| {
            format!("backup target {url}: write s3://BUCKET@REGION/PATH (the path may be /)")
        })?;
        let (bucket, region) = match authority.split_once('@') {
            Some((b, r)) => (b, (!r.is_empty()).then(|| r.to_string())),
            None => (authority, None),
        };
        if bucket.is_empty() {
            return Err(format!("backup target {url}: no bucket name"));
        }
        let name_ok = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        if !name_ok(bucket) || region.as_deref().is_some_and(|r| !name_ok(r)) {
            return Err(format!(
                "backup target {url}: bucket and region are letters, digits, '.', '-' and '_'"
            ));
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            region,
            path: path.trim_start_matches('/').to_string(),
        })
    }

    /// Longhorn's `GetURL()`: `s3://bucket[@region]/<trimmed path>`.
    pub fn normalised(&self) -> String {
        match &self.region {
            Some(r) => format!("s3://{}@{}/{}", self.bucket, r, self.path),
            None => format!("s3://{}/{}", self.bucket, self.path),
        }
    }
}

/// Opens an `s3://` target.
pub fn open(
    url: &str,
    credentials: &HashMap<String, String>,
    policy: &Arc<EndpointPolicy>,
) -> Result<ObjectDriver, String> {
    let parsed = S3Url::parse(url)?;
    let note = match setting(credentials, "AWS_ACCESS_KEY_ID") {
        None => " (no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in envs: the instance metadata service was asked for credentials)",
        Some(_) => "",
    };
    ObjectDriver::open(
        "s3",
        "S3",
        &parsed.normalised(),
        credentials,
        policy,
        &parsed.path,
        note,
        || {
            build_store(url, &parsed, credentials, policy)
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        },
    )
}

fn build_store(
    url: &str,
    parsed: &S3Url,
    credentials: &HashMap<String, String>,
    policy: &Arc<EndpointPolicy>,
) -> Result<object_store::aws::AmazonS3, String> {
    let region = parsed
        .region
        .as_deref()
        .or(setting(credentials, "AWS_REGION"))
        .unwrap_or("us-east-1");
    let endpoint = setting(credentials, "AWS_ENDPOINTS").map(|e| e.trim_end_matches('/'));
    if let Some(e) = endpoint {
        check_endpoint(e, "keys go in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY").map_err(|why| {
            format!("backup target {url}: AWS_ENDPOINTS {e:?} {why}; write http(s)://HOST[:PORT]")
        })?;
    }
    check_proxies(url, credentials)?;
    let virtual_hosted = match setting(credentials, "VIRTUAL_HOSTED_STYLE") {
        Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(format!(
                "backup target {url}: VIRTUAL_HOSTED_STYLE is {other:?}; write true or false"
            ))
        }
        None => endpoint.is_none(),
    };
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&parsed.bucket)
        .with_region(region)
        .with_virtual_hosted_style_request(virtual_hosted)
        .with_retry(super::http::retry())
        .with_client_options(super::http::client_options())
        .with_http_connector(Connector::new(
            url,
            credentials,
            policy,
            "AWS_CERT",
            policy.instance_metadata && setting(credentials, "AWS_ACCESS_KEY_ID").is_none(),
        )?);
    if let Some(endpoint) = endpoint {
        // object_store wants the bucket in a virtual-hosted endpoint; the Go SDK adds it.
        let endpoint = match (virtual_hosted, endpoint.split_once("://")) {
            (true, Some((scheme, host))) => format!("{scheme}://{}.{host}", parsed.bucket),
            _ => endpoint.to_string(),
        };
        builder = builder.with_endpoint(endpoint);
    }
    match (
        setting(credentials, "AWS_ACCESS_KEY_ID"),
        setting(credentials, "AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(id), Some(secret)) => {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
            if let Some(token) = setting(credentials, "AWS_SESSION_TOKEN") {
                builder = builder.with_token(token);
            }
        }
        (None, None) => {}
        _ => {
            return Err(format!(
                "backup target {url}: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be given together"
            ))
        }
    }
    check_destinations(url, parsed, region, credentials, policy)?;
    builder
        .build()
        .map_err(|e| format!("backup target {url}: {e}"))
}

/// Checks every destination the settings name before the first request: the S3 endpoint
/// (`AWS_ENDPOINTS`, or AWS's own for the region), the proxies, and whether a keyless target
/// may ask the instance metadata service. Names are resolved here too, so a refused address
/// is said before anything is sent.
fn check_destinations(
    url: &str,
    parsed: &S3Url,
    region: &str,
    credentials: &HashMap<String, String>,
    policy: &EndpointPolicy,
) -> Result<(), String> {
    if policy.is_unrestricted() {
        return Ok(());
    }
    if setting(credentials, "AWS_ACCESS_KEY_ID").is_none() && !policy.instance_metadata {
        return Err(format!(
            "backup target {url}: no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in envs, and asking the instance metadata service (169.254.169.254) for credentials is {REFUSED}; set backup_target.instance_metadata: true in lhnet's config to allow it"
        ));
    }
    let endpoint = match setting(credentials, "AWS_ENDPOINTS") {
        Some(e) => ("AWS_ENDPOINTS", e.to_string()),
        None => (
            "the target URL's endpoint",
            format!("https://{}.s3.{region}.amazonaws.com", parsed.bucket),
        ),
    };
    super::http::check_destinations(url, credentials, policy, (endpoint.0, &endpoint.1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Driver;

    #[test]
    fn urls_as_longhorn_parses_them() {
        let u = S3Url::parse("s3://backupbucket@us-east-1/s3-test").unwrap();
        assert_eq!(
            u,
            S3Url {
                bucket: "backupbucket".into(),
                region: Some("us-east-1".into()),
                path: "s3-test".into()
            }
        );
        assert_eq!(u.normalised(), "s3://backupbucket@us-east-1/s3-test");
        let root = S3Url::parse("s3://b/").unwrap();
        assert_eq!((root.region, root.path.as_str()), (None, ""));
        assert_eq!(
            S3Url::parse("s3://b@r/p/").unwrap().normalised(),
            "s3://b@r/p/",
            "Go keeps a trailing slash in GetURL()"
        );
        assert!(S3Url::parse("s3://bucket").unwrap_err().contains("PATH"));
        assert!(S3Url::parse("s3://@r/p").unwrap_err().contains("no bucket"));
        assert!(S3Url::parse("s3://b a@r/p").is_err());
        assert!(S3Url::parse("s3://b@r?x/p").is_err());
    }

    #[test]
    fn settings_are_checked_before_any_request() {
        let creds = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        // Targets are opened on a runtime; this thread is not one of its async threads.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let strict = Arc::new(EndpointPolicy::default());
        let err = open(
            "s3://b@r/p",
            &creds(&[("AWS_CERT", "-----BEGIN CERTIFICATE-----\nnot base64\n")]),
            &strict,
        )
        .unwrap_err();
        assert!(err.contains("AWS_CERT"), "{err}");
        let err = open(
            "s3://b@r/p",
            &creds(&[("VIRTUAL_HOSTED_STYLE", "maybe")]),
            &strict,
        )
        .unwrap_err();
        assert!(err.contains("VIRTUAL_HOSTED_STYLE"), "{err}");
        let err = open("s3://b@r/p", &creds(&[("AWS_ACCESS_KEY_ID", "a")]), &strict).unwrap_err();
        assert!(err.contains("together"), "{err}");
        // A malformed endpoint is refused when the target is opened, never a panic.
        for endpoint in [
            "not a url",
            "http://[::1",
            "ftp://x y",
            "http://127.0.0.1:99999",
            "http://h/p?q",
            "http://user:pw@h",
        ] {
            let settings = creds(&[
                ("AWS_ENDPOINTS", endpoint),
                ("AWS_ACCESS_KEY_ID", "k"),
                ("AWS_SECRET_ACCESS_KEY", "s"),
            ]);
            let result = open("s3://b@r/p", &settings, &strict)
                .and_then(|d| d.list("backupstore").map_err(|e| e.to_string()));
            let err = result.expect_err(endpoint);
            assert!(
                !err.contains("a bug in lhnet"),
                "{endpoint}: the task panicked: {err}"
            );
        }
        // Proxies: a path or another scheme is refused, and a password never shown.
        for (proxy, want) in [
            ("socks5://h:1080", "not http or https"),
            ("http://user:hunter2@h:3128/p", "has a path"),
            ("nonsense", "is not a URL"),
        ] {
            let settings = creds(&[
                ("HTTPS_PROXY", proxy),
                ("AWS_ACCESS_KEY_ID", "k"),
                ("AWS_SECRET_ACCESS_KEY", "s"),
            ]);
            let err = open("s3://b@r/p", &settings, &strict).unwrap_err();
            assert!(err.contains(want) && err.contains("HTTPS_PROXY"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        // Keyless: the metadata lookup only when the config allows it.
        let err = open(
            "s3://b@r/p",
            &creds(&[("AWS_ENDPOINTS", "http://10.9.9.9:9000")]),
            &strict,
        )
        .unwrap_err();
        assert!(
            err.contains("backup_target.instance_metadata: true") && err.contains(REFUSED),
            "{err}"
        );
        // Empty values are unset: the manager sends every key.
        open(
            "s3://b@r/p",
            &creds(&[("AWS_ENDPOINTS", ""), ("AWS_CERT", ""), ("HTTPS_PROXY", "")]),
            &Arc::new(EndpointPolicy::unrestricted()),
        )
        .unwrap();
    }
}
