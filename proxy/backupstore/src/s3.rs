//! `s3://BUCKET@REGION/PATH` (or `s3://BUCKET/PATH`) through Apache Arrow's `object_store`.
//!
//! Credentials and settings come from the call's `envs` (spec §2.5), never from the process
//! environment: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_REGION`
//! (when the URL has no `@REGION`; default `us-east-1`), `AWS_ENDPOINTS` (MinIO and friends;
//! path-style unless `VIRTUAL_HOSTED_STYLE=true`), `AWS_CERT` (PEM added to the system roots),
//! `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`. Empty values count as unset, as the manager sends every
//! key. Without keys the store falls back to the instance metadata service (IAM roles), as the
//! AWS SDK in Longhorn does.
//!
//! Requests run on the tokio runtime the target was opened on (lhnet's own; a simulator pod's),
//! driven by the synchronous [`Driver`] calls, which run on the blocking pool. Each request has a 30 s timeout and up to 3 retries
//! (Longhorn's `MaxRetries`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use http_body_util::BodyExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use super::driver::Driver;
use super::endpoints::{excerpt, redact, Destination, EndpointPolicy, REFUSED};

/// One S3 request's limit (each retry gets its own).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of an S3 error (which quotes the target's answer) goes into lhnet's errors.
const MAX_ERROR_CHARS: usize = 300;
/// Stores kept for reuse (their connection pools), keyed by target and settings.
const CACHED_STORES: usize = 16;

/// An S3 backup target.
#[derive(Debug)]
pub struct S3Driver {
    store: Arc<AmazonS3>,
    /// The runtime requests run on: the one the target was opened on.
    runtime: tokio::runtime::Handle,
    /// `PATH/` (or empty for `s3://bucket/`), before `backupstore/…`.
    prefix: String,
    /// No keys in `envs`: errors say that credentials came from the instance metadata service.
    keyless: bool,
}

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

/// The settings of one call, from its `envs`; empty values are unset.
fn setting<'a>(credentials: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    credentials
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

impl S3Driver {
    pub fn open(
        url: &str,
        credentials: &HashMap<String, String>,
        policy: &Arc<EndpointPolicy>,
    ) -> Result<S3Driver, String> {
        let parsed = S3Url::parse(url)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            format!("backup target {url}: s3 targets are opened on a tokio runtime (its requests run there)")
        })?;
        // A store's connections belong to the network namespace they were made in (the
        // simulator runs pods as namespaces of one process): one store per namespace.
        let netns = std::fs::read_link("/proc/thread-self/ns/net")
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        let key = {
            let sorted: BTreeMap<_, _> = credentials.iter().collect();
            format!("{}|{sorted:?}|{policy:?}|{netns}", parsed.normalised())
        };
        static STORES: OnceLock<Mutex<HashMap<String, Arc<AmazonS3>>>> = OnceLock::new();
        let stores = STORES.get_or_init(Default::default);
        let cached = stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let store = match cached {
            Some(s) => s,
            None => {
                let store = Arc::new(build_store(url, &parsed, credentials, policy)?);
                let mut map = stores.lock().unwrap_or_else(|p| p.into_inner());
                if map.len() >= CACHED_STORES {
                    map.clear();
                }
                map.insert(key, store.clone());
                store
            }
        };
        let path = parsed.path.trim_end_matches('/');
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let keyless = setting(credentials, "AWS_ACCESS_KEY_ID").is_none();
        Ok(S3Driver {
            store,
            runtime,
            prefix,
            keyless,
        })
    }

    fn key(&self, path: &str) -> Path {
        Path::from(format!("{}{}", self.prefix, path.trim_matches('/')))
    }
}

fn build_store(
    url: &str,
    parsed: &S3Url,
    credentials: &HashMap<String, String>,
    policy: &Arc<EndpointPolicy>,
) -> Result<AmazonS3, String> {
    let region = parsed
        .region
        .as_deref()
        .or(setting(credentials, "AWS_REGION"))
        .unwrap_or("us-east-1");
    let endpoint = setting(credentials, "AWS_ENDPOINTS").map(|e| e.trim_end_matches('/'));
    if let Some(e) = endpoint {
        check_endpoint(e).map_err(|why| {
            format!("backup target {url}: AWS_ENDPOINTS {e:?} {why}; write http(s)://HOST[:PORT]")
        })?;
    }
    for key in ["HTTPS_PROXY", "HTTP_PROXY"] {
        if let Some(p) = setting(credentials, key) {
            check_proxy(p).map_err(|why| {
                format!(
                    "backup target {url}: {key} {why}; write http(s)://[USER:PASSWORD@]HOST[:PORT]"
                )
            })?;
        }
    }
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
        .with_retry(RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(45),
            ..Default::default()
        })
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(true)
                .with_timeout(REQUEST_TIMEOUT)
                .with_connect_timeout(CONNECT_TIMEOUT),
        )
        .with_http_connector(Connector::new(url, credentials, policy)?);
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

/// An endpoint object_store can put in a request: `http(s)://HOST[:PORT]`, nothing else.
fn check_endpoint(endpoint: &str) -> Result<(), &'static str> {
    let url = url::Url::parse(endpoint).map_err(|_| "is not a URL")?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("is not http or https");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host");
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err("has a path");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("holds a user name (keys go in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)");
    }
    Ok(())
}

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

/// Builds the HTTP client from the call's settings only (its proxies, none from the process
/// environment, and its extra CA), guarded by the destination policy: every request's host is
/// checked before it is sent, every name after it resolves, every redirect before it is
/// followed, and every answer is cut at [`MAX_RESPONSE_BYTES`] ([`MAX_CFG_BYTES`]).
#[derive(Debug)]
struct Connector {
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
    fn new(
        url: &str,
        credentials: &HashMap<String, String>,
        policy: &Arc<EndpointPolicy>,
    ) -> Result<Connector, String> {
        let roots = match setting(credentials, "AWS_CERT") {
            Some(pem) => {
                let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
                    format!("backup target {url}: AWS_CERT is not a PEM bundle: {e}")
                })?;
                if certs.is_empty() {
                    return Err(format!(
                        "backup target {url}: AWS_CERT holds no PEM certificate"
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
            metadata: policy.instance_metadata
                && setting(credentials, "AWS_ACCESS_KEY_ID").is_none(),
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
                if attempt.previous().len() >= MAX_REDIRECTS {
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
    // Proxies first; through a proxy, the endpoint's name is the proxy's to resolve.
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
    let parsed = url::Url::parse(&text)
        .map_err(|e| format!("backup target {url}: {key} is not a URL ({e})"))?;
    match proxied {
        true => policy.check_url(key, &parsed),
        false => policy.check_url_resolving(key, &parsed),
    }
    .map_err(|refused| format!("backup target {url}: {refused}"))?;
    Ok(())
}

impl S3Driver {
    /// Runs `work` on the runtime the target was opened on (lhnet's, or the simulator pod's)
    /// and waits for it. Driver calls run off the async threads (the blocking pool, or threads
    /// of their own), so waiting here stalls no runtime worker.
    fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> io::Result<T> {
        // Handle::block_on panics on an async thread; said as an error instead.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.runtime.block_on(work)
        })) {
            Ok(done) => Ok(done),
            Err(_) => Err(io::Error::other(
                "an S3 call was made on an async thread of the runtime (lhnet runs driver calls on the blocking pool; this is a bug in lhnet)",
            )),
        }
    }
}

impl S3Driver {
    fn io_error(&self, what: &str, path: &Path, e: object_store::Error) -> io::Error {
        if let object_store::Error::NotFound { .. } = e {
            return io::Error::new(io::ErrorKind::NotFound, format!("{path} not found"));
        }
        // The whole chain: a refusal or a limit is said by the innermost error.
        let mut parts = vec![e.to_string()];
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let text = s.to_string();
            if !parts.iter().any(|p| p.contains(&text)) {
                parts.push(text);
            }
            source = s.source();
        }
        // lhnet's own refusal is said whole; anything else quotes the target only in part.
        if let Some(refused) = parts.iter().find(|p| p.contains(REFUSED)) {
            return io::Error::other(format!("S3 {what} {path}: {refused}"));
        }
        // The innermost cause first (a refused connection, a limit), then the rest in part.
        let inner = parts.pop().unwrap_or_default();
        let text = match parts.is_empty() {
            true => excerpt(&inner, MAX_ERROR_CHARS),
            false => format!(
                "{} ({})",
                excerpt(&inner, MAX_ERROR_CHARS),
                excerpt(&parts.join(": "), MAX_ERROR_CHARS)
            ),
        };
        let keyless = if self.keyless {
            " (no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in envs: the instance metadata service was asked for credentials)"
        } else {
            ""
        };
        io::Error::other(format!("S3 {what} {path}: {text}{keyless}"))
    }
}

/// The last segment of an object path.
fn name_of(path: &Path) -> String {
    path.filename().unwrap_or_default().to_string()
}

impl Driver for S3Driver {
    fn kind(&self) -> &'static str {
        "s3"
    }

    /// `ListObjects` with delimiter `/`: objects and common prefixes alike.
    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let (store, key) = (self.store.clone(), self.key(dir));
        let result = self
            .run(async move { store.list_with_delimiter(Some(&key)).await })?
            .map_err(|e| self.io_error("list", &self.key(dir), e))?;
        let mut names: Vec<String> = result.common_prefixes.iter().map(name_of).collect();
        names.extend(result.objects.iter().map(|o| name_of(&o.location)));
        Ok(names)
    }

    fn walk(&self, dir: &str) -> io::Result<Vec<String>> {
        let (store, key) = (self.store.clone(), self.key(dir));
        let base = key.clone();
        let metas = self
            .run(async move {
                store
                    .list(Some(&key))
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<object_store::Result<Vec<_>>>()
            })?
            .map_err(|e| self.io_error("list", &base, e))?;
        Ok(metas
            .iter()
            .filter_map(|m| {
                m.location
                    .prefix_match(&base)
                    .map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>())
            })
            .map(|parts| parts.join("/"))
            .collect())
    }

    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        let (store, key) = (self.store.clone(), self.key(path));
        self.run(async move {
            match store.get(&key).await {
                Ok(got) => got.bytes().await.map(|b| b.to_vec()),
                Err(e) => Err(e),
            }
        })?
        .map_err(|e| self.io_error("get", &self.key(path), e))
    }

    /// A PUT replaces the object as a whole.
    fn write(&self, path: &str, data: &[u8]) -> io::Result<()> {
        let (store, key) = (self.store.clone(), self.key(path));
        let payload = PutPayload::from(data.to_vec());
        self.run(async move { store.put(&key, payload).await.map(|_| ()) })?
            .map_err(|e| self.io_error("put", &self.key(path), e))
    }

    fn exists(&self, path: &str) -> io::Result<bool> {
        match self.modified(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn modified(&self, path: &str) -> io::Result<SystemTime> {
        let (store, key) = (self.store.clone(), self.key(path));
        self.run(async move { store.head(&key).await })?
            .map(|meta| SystemTime::from(meta.last_modified))
            .map_err(|e| self.io_error("head", &self.key(path), e))
    }

    /// The object itself, then every key under `path/`, one DELETE each (as Longhorn does).
    fn remove(&self, path: &str) -> io::Result<()> {
        let (store, key) = (self.store.clone(), self.key(path));
        let shown = key.clone();
        self.run(async move {
            match store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            let mut under = store.list(Some(&key));
            let mut keys = Vec::new();
            while let Some(meta) = under.next().await {
                keys.push(meta?.location);
            }
            for k in keys {
                match store.delete(&k).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })?
        .map_err(|e| self.io_error("delete", &shown, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = S3Driver::open(
            "s3://b@r/p",
            &creds(&[("AWS_CERT", "-----BEGIN CERTIFICATE-----\nnot base64\n")]),
            &strict,
        )
        .unwrap_err();
        assert!(err.contains("AWS_CERT"), "{err}");
        let err = S3Driver::open(
            "s3://b@r/p",
            &creds(&[("VIRTUAL_HOSTED_STYLE", "maybe")]),
            &strict,
        )
        .unwrap_err();
        assert!(err.contains("VIRTUAL_HOSTED_STYLE"), "{err}");
        let err = S3Driver::open("s3://b@r/p", &creds(&[("AWS_ACCESS_KEY_ID", "a")]), &strict)
            .unwrap_err();
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
            let result = S3Driver::open("s3://b@r/p", &settings, &strict)
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
            let err = S3Driver::open("s3://b@r/p", &settings, &strict).unwrap_err();
            assert!(err.contains(want) && err.contains("HTTPS_PROXY"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        // Keyless: the metadata lookup only when the config allows it.
        let err = S3Driver::open(
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
        S3Driver::open(
            "s3://b@r/p",
            &creds(&[("AWS_ENDPOINTS", ""), ("AWS_CERT", ""), ("HTTPS_PROXY", "")]),
            &Arc::new(EndpointPolicy::unrestricted()),
        )
        .unwrap();
    }
}
