//! `lhnet-proxy webhook`: a mutating admission webhook (AdmissionReview v1) that injects lhnet
//! into instance-manager and backing-image-manager pods at CREATE, with the same patch as
//! `lhnet-proxy inject`. It never blocks a pod: anything it cannot handle is answered
//! `allowed: true` without a patch, with a warning. TLS (rustls) reloads a renewed certificate
//! without a restart. `webhook-cert` makes a CA and serving certificate for clusters without
//! cert-manager.

use parking_lot::Mutex;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::inject::{document_patch, Decision, InjectOptions};
use crate::listener::Activity;

/// A webhook connection with no review in progress for this long is closed (the API server
/// opens a new one when it needs it); also the time a client has to send a request's headers.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest AdmissionReview body read (the API server's own request limit is 3 MiB).
pub const MAX_BODY: usize = 3 << 20;

/// Answers one AdmissionReview. Never an error: what it cannot handle is allowed unchanged,
/// with a warning that says why.
pub fn review(body: &[u8], opts: &InjectOptions) -> Value {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let request = parsed.as_ref().and_then(|v| v.get("request"));
    let uid = request
        .and_then(|r| r.get("uid"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let answer = |patch: Option<&[Value]>, warnings: Vec<String>| allowed(&uid, patch, warnings);
    let warn = |text: String| not_handled(&uid, &text);
    if body.len() > MAX_BODY {
        return warn(format!(
            "request body of {} bytes is over {MAX_BODY}",
            body.len()
        ));
    }
    let Some(review) = parsed.as_ref() else {
        return warn("the request body is not JSON".into());
    };
    if review.get("kind").and_then(Value::as_str) != Some("AdmissionReview") {
        return warn("the body is not an AdmissionReview".into());
    }
    let Some(request) = request else {
        return warn("the AdmissionReview has no request".into());
    };
    if uid.is_empty() {
        return warn("the AdmissionReview request has no uid".into());
    }
    let kind = request.pointer("/kind/kind").and_then(Value::as_str);
    let operation = request.get("operation").and_then(Value::as_str);
    if kind != Some("Pod") || operation != Some("CREATE") {
        return answer(None, Vec::new());
    }
    let Some(pod) = request.get("object").filter(|o| o.is_object()) else {
        return warn("the request has no object".into());
    };
    match document_patch(pod, opts) {
        Ok(Decision::Skip(why)) => {
            tracing::debug!(uid = %uid, "not injected: {why}");
            answer(None, Vec::new())
        }
        Ok(Decision::Inject { patch, warnings }) => {
            let name = pod
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("(generated name)");
            tracing::info!(uid = %uid, pod = %name, "injected");
            answer(
                Some(&patch),
                warnings
                    .into_iter()
                    .map(|w| format!("lhnet: {w}"))
                    .collect(),
            )
        }
        Err(e) => warn(e),
    }
}

/// An AdmissionReview answer that allows the pod, with a patch or not.
fn allowed(uid: &str, patch: Option<&[Value]>, warnings: Vec<String>) -> Value {
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(patch) = patch {
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(patch).unwrap_or_default());
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(encoded);
    }
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// Allowed without a patch, with a warning that says why lhnet did nothing.
fn not_handled(uid: &str, text: &str) -> Value {
    tracing::warn!("admission review not handled: {text}");
    allowed(uid, None, vec![format!("lhnet: not injected: {text}")])
}

/// The serving certificate, reloaded when its files change.
struct Tls {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<(Option<SystemTime>, Arc<ServerConfig>)>,
}

fn modified(cert: &Path, key: &Path) -> Option<SystemTime> {
    let a = std::fs::metadata(cert).and_then(|m| m.modified()).ok()?;
    let b = std::fs::metadata(key).and_then(|m| m.modified()).ok()?;
    Some(a.max(b))
}

fn load_tls(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs = crate::tls::read_certs(cert).map_err(|e| e.to_string())?;
    let key = crate::tls::read_key(key).map_err(|e| e.to_string())?;
    let mut config = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not make a TLS identity: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Tls {
    fn new(cert: PathBuf, key: PathBuf) -> Result<Tls, String> {
        let config = load_tls(&cert, &key)?;
        let stamp = modified(&cert, &key);
        Ok(Tls {
            cert,
            key,
            state: Mutex::new((stamp, config)),
        })
    }

    /// The current config; re-read when the files changed (a renewed certificate). A renewal
    /// that does not load keeps the old one and says why.
    fn current(&self) -> Arc<ServerConfig> {
        // Nothing panics while holding it; if something did, the data is still whole.
        let mut state = self.state.lock();
        let stamp = modified(&self.cert, &self.key);
        if stamp.is_some() && stamp != state.0 {
            match load_tls(&self.cert, &self.key) {
                Ok(config) => {
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                    *state = (stamp, config);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewed certificate does not load; keeping the old one");
                    state.0 = stamp;
                }
            }
        }
        state.1.clone()
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

async fn handle(request: Request<Incoming>, opts: Arc<InjectOptions>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    // Too large or broken: allowed, with a warning (failurePolicy is Ignore).
                    let text = format!(
                        "the request body was not read (over {MAX_BODY} bytes or broken): {e}"
                    );
                    return json_response(&not_handled("", &text));
                }
            };
            json_response(&review(&body, &opts))
        }
        _ => text(StatusCode::NOT_FOUND, "POST /mutate, GET /healthz\n"),
    }
}

fn json_response(v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(v).unwrap_or_default(),
    )));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves HTTPS on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    cert: PathBuf,
    key: PathBuf,
    opts: InjectOptions,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let tls = Arc::new(Tls::new(cert, key)?);
    let opts = Arc::new(opts);
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(address = %addr, "admission webhook listening (HTTPS)");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = TlsAcceptor::from(tls.current());
        let opts = opts.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            // Reviews in progress, and since when none: an idle connection closes.
            let activity = Arc::new(Activity::new());
            let counted = activity.clone();
            let service = service_fn(move |r| {
                let opts = opts.clone();
                let active = counted.begin();
                async move {
                    let response = handle(r, opts).await;
                    drop(active);
                    Ok::<_, Infallible>(response)
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(IDLE_TIMEOUT);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(IDLE_TIMEOUT))
                .keep_alive_timeout(Duration::from_secs(5));
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let mut closing = false;
            loop {
                let check = activity.next_idle_check(IDLE_TIMEOUT);
                tokio::select! {
                    ended = connection.as_mut() => {
                        if let Err(e) = ended {
                            tracing::debug!(peer = %peer, error = %e, "webhook connection ended with an error");
                        }
                        return;
                    }
                    _ = tokio::time::sleep_until(check), if !closing => {
                        if activity.is_idle() && tokio::time::Instant::now() >= activity.idle_since() + IDLE_TIMEOUT {
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                    _ = tokio::time::sleep(IDLE_TIMEOUT), if closing => return,
                }
            }
        });
    }
}

/// Binds `listen` and serves (for the command).
pub async fn run(
    listen: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    opts: InjectOptions,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    serve(listener, cert, key, opts, shutdown).await
}

/// The files `webhook-cert` writes.
pub struct CertFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// base64 of the CA PEM, for `clientConfig.caBundle`.
    pub ca_bundle: String,
}

/// Makes a CA and a serving certificate for `<service>.<namespace>.svc` in `dir`.
pub fn make_certs(service: &str, namespace: &str, dir: &Path) -> Result<CertFiles, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let fail = |e: rcgen::Error| format!("making certificates: {e}");
    let ca_key = KeyPair::generate().map_err(fail)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("lhnet webhook CA ({namespace}/{service})"),
    );
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(fail)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let names = vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    let key = KeyPair::generate().map_err(fail)?;
    let mut params = CertificateParams::new(names).map_err(fail)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{service}.{namespace}.svc"));
    let cert = params.signed_by(&key, &issuer).map_err(fail)?;

    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let files = CertFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca_bundle: base64::engine::general_purpose::STANDARD.encode(ca_cert.pem()),
    };
    for (path, text) in [
        (&files.ca, ca_cert.pem()),
        (&files.cert, cert.pem()),
        (&files.key, key.serialize_pem()),
    ] {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(files)
}
