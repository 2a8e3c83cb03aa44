//! The HTTP client of the object-store targets (s3, azblob): built from the call's settings
//! only (its proxies, none from the process environment, and its extra CA) and guarded by
//! the destination policy: every request's host is checked before it is sent, every name's
//! addresses as the connection resolves them, every redirect before it is followed, and every
//! answer is cut at [`MAX_RESPONSE_BYTES`] ([`MAX_CFG_BYTES`] for a `.cfg`).

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::{ClientOptions, RetryConfig};

use super::endpoints::{redact, Destination, EndpointPolicy};
use super::object::setting;

/// One request's limit (each retry gets its own).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A proxy URL reqwest can use: `http(s)://[USER:PASSWORD@]HOST[:PORT]`; the error never
/// shows the password.
fn check_proxy(proxy: &str) -> Result<(), String> {
    let url = url::Url::parse(proxy).map_err(|e| format!("is not a URL ({e})"))?;
    let shown = redact(&url);
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{shown} is not http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{shown} has no host"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err(format!("{shown} has a path"));
    }
    Ok(())
}

/// Makes the guarded client object_store calls.
#[derive(Debug)]
pub struct Connector {
    https_proxy: Option<String>,
    http_proxy: Option<String>,
    no_proxy: Option<String>,
    roots: Vec<reqwest::Certificate>,
    policy: Arc<EndpointPolicy>,
    /// Keyless and `instance_metadata`: the credential lookup may dial the metadata address.
    metadata: bool,
}

/// The most one S3 answer may hold, so a target answering endless bytes costs bounded memory:
/// a listing page, an error or a block (at most 16 MiB, compressed less) fits in 64 MiB...
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// ... and a `.cfg` object in 512 MiB: a backup.cfg lists every block, about 100 bytes each,
/// 50 MiB for 1 TiB in 2 MiB blocks.
pub const MAX_CFG_BYTES: usize = 512 << 20;

impl Connector {
    /// From the call's settings: `cert_key` names its PEM bundle (`AWS_CERT`, `AZBLOB_CERT`);
    /// `metadata`: the credential lookup may dial the metadata address (keyless S3 targets
    /// with `instance_metadata`).
    pub fn new(
        url: &str,
        credentials: &HashMap<String, String>,
        policy: &Arc<EndpointPolicy>,
        cert_key: &str,
        metadata: bool,
    ) -> Result<Connector, String> {
        let roots = match setting(credentials, cert_key) {
            Some(pem) => {
                let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
                    format!("backup target {url}: {cert_key} is not a PEM bundle: {e}")
                })?;
                if certs.is_empty() {
                    return Err(format!(
                        "backup target {url}: {cert_key} holds no PEM certificate"
                    ));
                }
                certs
            }
            None => Vec::new(),
        };
        let owned = |k: &str| setting(credentials, k).map(str::to_string);
        Ok(Connector {
            https_proxy: owned("HTTPS_PROXY"),
            http_proxy: owned("HTTP_PROXY"),
            no_proxy: owned("NO_PROXY"),
            roots,
            policy: policy.clone(),
            metadata,
        })
    }

    fn client(&self) -> Result<reqwest::Client, reqwest::Error> {
        // reqwest is built without a crypto provider: lhnet's is ring, as for its webhook.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let no_proxy = || {
            self.no_proxy
                .as_deref()
                .and_then(reqwest::NoProxy::from_string)
        };
        let redirects = self.policy.clone();
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .tls_certs_merge(self.roots.iter().cloned())
            .dns_resolver(Arc::new(CheckedResolver(self.policy.clone())))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                // `previous` holds the URL asked first and every redirect followed so far.
                if attempt.previous().len() > MAX_REDIRECTS {
                    return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                }
                match redirects.check_url("a redirect to", attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(refused) => attempt.error(refused),
                }
            }));
        if let Some(p) = &self.https_proxy {
            builder = builder.proxy(reqwest::Proxy::https(p)?.no_proxy(no_proxy()));
        }
        if let Some(p) = &self.http_proxy {
            builder = builder.proxy(reqwest::Proxy::http(p)?.no_proxy(no_proxy()));
        }
        builder.build()
    }
}

const MAX_REDIRECTS: usize = 5;

impl HttpConnector for Connector {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        let client = self.client().map_err(|e| object_store::Error::Generic {
            store: "S3",
            source: Box::new(e),
        })?;
        Ok(HttpClient::new(Guarded {
            client,
            policy: self.policy.clone(),
            metadata: self.metadata,
        }))
    }
}

/// The client object_store calls: the request's destination checked first, the answer
/// bounded.
#[derive(Debug)]
struct Guarded {
    client: reqwest::Client,
    policy: Arc<EndpointPolicy>,
    metadata: bool,
}

#[async_trait::async_trait]
impl HttpService for Guarded {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let uri = request.uri();
        let host = uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']');
        let metadata_lookup =
            self.metadata && host.parse().is_ok_and(EndpointPolicy::metadata_address);
        if !metadata_lookup {
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            self.policy
                .check(Destination {
                    key: "an S3 request to",
                    host,
                    port,
                })
                .map_err(|refused| {
                    HttpError::new(HttpErrorKind::Unknown, io::Error::other(refused))
                })?;
        }
        let limit = if uri.path().ends_with(".cfg") {
            MAX_CFG_BYTES
        } else {
            MAX_RESPONSE_BYTES
        };
        let answer = self.client.call(request).await?;
        let (parts, body) = answer.into_parts();
        let announced = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|n| n > limit as u64) {
            return Err(HttpError::new(
                HttpErrorKind::Decode,
                io::Error::other(format!(
                    "the target announced {} bytes, more than lhnet reads in one answer ({} MiB)",
                    announced.unwrap_or(0),
                    limit >> 20
                )),
            ));
        }
        let body = http_body_util::Limited::new(body, limit).map_err(move |e| {
            let e = match e.downcast::<HttpError>() {
                Ok(e) => return *e,
                Err(e) => e,
            };
            HttpError::new(
                HttpErrorKind::Decode,
                io::Error::other(format!(
                    "the target answered more than {} MiB ({e}); lhnet stops reading there",
                    limit >> 20
                )),
            )
        });
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// The system resolver, with only the addresses the policy allows.
struct CheckedResolver(Arc<EndpointPolicy>);

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let name = name.as_str().to_string();
        Box::pin(async move {
            let found = tokio::net::lookup_host((name.as_str(), 0)).await?;
            let allowed = policy
                .check_resolved(&name, found)
                .map_err(io::Error::other)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Checks the proxies and the endpoint a target's settings name, before the first request;
/// names are resolved here too, so a refused address is said before anything is sent.
/// Through a proxy, the endpoint's name is the proxy's to resolve.
pub fn check_destinations(
    url: &str,
    credentials: &HashMap<String, String>,
    policy: &EndpointPolicy,
    endpoint: (&str, &str),
) -> Result<(), String> {
    if policy.is_unrestricted() {
        return Ok(());
    }
    let mut proxied = false;
    for key in ["HTTPS_PROXY", "HTTP_PROXY"] {
        if let Some(p) = setting(credentials, key) {
            proxied = true;
            let parsed = url::Url::parse(p)
                .map_err(|e| format!("backup target {url}: {key} is not a URL ({e})"))?;
            policy
                .check_url_resolving(key, &parsed)
                .map_err(|refused| format!("backup target {url}: {refused}"))?;
        }
    }
    let (key, text) = endpoint;
    let parsed = url::Url::parse(text)
        .map_err(|e| format!("backup target {url}: {key} is not a URL ({e})"))?;
    match proxied {
        true => policy.check_url(key, &parsed),
        false => policy.check_url_resolving(key, &parsed),
    }
    .map_err(|refused| format!("backup target {url}: {refused}"))
}

/// An endpoint object_store can put in a request: `http(s)://HOST[:PORT]`, nothing else;
/// `credentials` says where a user name in it belongs instead.
pub fn check_endpoint(endpoint: &str, credentials: &str) -> Result<(), String> {
    let url = url::Url::parse(endpoint).map_err(|_| "is not a URL".to_string())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("is not http or https".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err("has a path".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("holds a user name ({credentials})"));
    }
    Ok(())
}

/// Longhorn's `MaxRetries` (3), within 45 s.
pub fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(45),
        ..Default::default()
    }
}

/// Each request within [`REQUEST_TIMEOUT`], its connection within [`CONNECT_TIMEOUT`]; http
/// endpoints allowed (MinIO, Azurite and moto are often plain HTTP).
pub fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(true)
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(CONNECT_TIMEOUT)
}

/// Checks the proxy settings' form (before any request).
pub fn check_proxies(url: &str, credentials: &HashMap<String, String>) -> Result<(), String> {
    for key in ["HTTPS_PROXY", "HTTP_PROXY"] {
        if let Some(p) = setting(credentials, key) {
            check_proxy(p).map_err(|why| {
                format!(
                    "backup target {url}: {key} {why}; write http(s)://[USER:PASSWORD@]HOST[:PORT]"
                )
            })?;
        }
    }
    Ok(())
}
