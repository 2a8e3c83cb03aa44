//! Longhorn's mTLS between the manager and an instance-manager (spec §5), for gRPC listeners
//! (`listeners[].tls`) and clusters (`clusters[].tls`): TLS 1.3 only, ALPN `h2`, one key pair
//! (`ca.crt`, `tls.crt`, `tls.key` of the `longhorn-grpc-tls` secret) on both sides. A server
//! requires a client certificate that chains to `ca.crt` and names
//! `longhorn-backend.longhorn-system` (a DNS SAN equal to it, or that CN: Longhorn's own check);
//! a client presents the same certificate and verifies the server as that name.
//!
//! The files are read again when they change (a rotated secret; looked at, at most, once a
//! second per listener or cluster): new connections take the new files, connections in flight
//! keep the session they have. A rotation to files that do not load keeps the last good ones
//! and logs why.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::config::{TlsConfig, TlsMode};

/// The name Longhorn's certificates carry and its peers check.
pub const LONGHORN_TLS_NAME: &str = "longhorn-backend.longhorn-system";
/// Where an instance-manager pod mounts the `longhorn-grpc-tls` secret.
pub const LONGHORN_TLS_DIR: &str = "/tls-files";

/// How often, at most, the files' modification times are looked at.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// Why TLS files do not make a TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("{what}")]
    Setup { what: String },
}

/// The certificates of a PEM file, at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            what: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| TlsError::Pem {
        path: path.into(),
        what: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key in it".into(),
            e => e.to_string(),
        },
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn setup(what: &str, e: impl std::fmt::Display) -> TlsError {
    TlsError::Setup {
        what: format!("{what}: {e}"),
    }
}

fn not_an_identity(tls: &TlsConfig, e: rustls::Error) -> TlsError {
    let what = format!(
        "{} and {} do not make a TLS identity",
        tls.cert.display(),
        tls.key.display()
    );
    setup(&what, e)
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(read_certs(ca)?);
    if added == 0 {
        return Err(TlsError::Pem {
            path: ca.into(),
            what: "no usable CA certificate in it".into(),
        });
    }
    Ok(roots)
}

/// A listener's TLS setup from its files.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&tls.ca)?), provider())
        .build()
        .map_err(|e| setup(&format!("client verifier from {}", tls.ca.display()), e))?;
    let verifier = Arc::new(NamedClients {
        inner,
        name: tls.peer_name.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup("TLS 1.3", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&tls.cert)?, read_key(&tls.key)?)
        .map_err(|e| not_an_identity(tls, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A cluster's TLS setup from its files.
pub fn client_config(tls: &TlsConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup("TLS 1.3", e))?
        .with_root_certificates(roots(&tls.ca)?)
        .with_client_auth_cert(read_certs(&tls.cert)?, read_key(&tls.key)?)
        .map_err(|e| not_an_identity(tls, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A tonic connector that dials `addr` and speaks TLS to it as `name` (a peer lookup; the
/// tests' manager).
pub fn connector(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
    name: String,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future: Send,
> + Clone
       + Send {
    tower::service_fn(move |_: http::Uri| {
        let (config, name) = (config.clone(), name.clone());
        async move {
            let name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        }
    })
}

/// A failed handshake in words: rustls' own text, with the cause of a refused certificate
/// (lhnet's name check) spelled out instead of debug-printed.
pub fn handshake_error(e: &std::io::Error) -> String {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return e.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(cause))) => {
            format!("invalid peer certificate: {cause}")
        }
        rustls::Error::PeerIncompatible(why) => {
            format!("the client is incompatible ({why:?}): lhnet accepts TLS 1.3 only, as Longhorn's instance-manager does")
        }
        other => other.to_string(),
    }
}

/// The names a certificate carries: its DNS SANs and its subject CN.
pub fn certificate_names(der: &[u8]) -> Option<(Vec<String>, Option<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let sans = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    Some((sans, cn))
}

/// The client certificate names `wanted` (DNS SAN or CN), as Longhorn checks it.
#[derive(Debug, thiserror::Error)]
#[error("the client certificate names {names} and not {wanted} (as a DNS SAN or CN)")]
struct WrongName {
    names: String,
    wanted: String,
}

/// WebPKI client verification, then Longhorn's name check.
#[derive(Debug)]
struct NamedClients {
    inner: Arc<dyn ClientCertVerifier>,
    name: String,
}

impl ClientCertVerifier for NamedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let (sans, cn) = certificate_names(end_entity).ok_or(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))?;
        if sans.contains(&self.name) || cn.as_deref() == Some(self.name.as_str()) {
            return Ok(verified);
        }
        let mut names: Vec<String> = sans.into_iter().map(|n| format!("DNS:{n}")).collect();
        names.extend(cn.map(|cn| format!("CN={cn}")));
        let names = match names.is_empty() {
            true => "nothing".to_string(),
            false => names.join(", "),
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(WrongName {
                names,
                wanted: self.name.clone(),
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS setup (server or client) that follows its files.
pub struct Reloading<T> {
    pub config: TlsConfig,
    what: &'static str,
    load: fn(&TlsConfig) -> Result<Arc<T>, TlsError>,
    state: Mutex<State<T>>,
}

struct State<T> {
    checked: Instant,
    stamp: Option<[SystemTime; 3]>,
    /// `None`: plaintext (`mode: optional`, the files absent or not loadable).
    current: Option<Arc<T>>,
}

pub type ServerTls = Reloading<ServerConfig>;
pub type ClientTls = Reloading<ClientConfig>;

impl ServerTls {
    /// A listener's TLS. `mode: required` with files that do not load is an error; `optional`
    /// serves plaintext then and says so (Longhorn's instance-manager does the same).
    pub fn for_listener(listener: &str, config: &TlsConfig) -> Result<Arc<ServerTls>, TlsError> {
        let (tls, failed) = Reloading::new(listener, config, "listener", server_config);
        match failed {
            Some(e) if config.mode == TlsMode::Required => Err(e),
            _ => Ok(Arc::new(tls)),
        }
    }

    /// The setup for a new client connection: `None` is plaintext (`mode: optional` without
    /// loadable files).
    pub fn for_accept(&self, listener: &str) -> Option<Arc<ServerConfig>> {
        self.current(listener)
    }
}

impl ClientTls {
    /// A cluster's TLS. Files that do not load are never fatal here: under `mode: required`
    /// every dial fails, naming the cause, until they load.
    pub fn for_cluster(cluster: &str, config: &TlsConfig) -> Arc<ClientTls> {
        Arc::new(Reloading::new(cluster, config, "cluster", client_config).0)
    }

    /// The setup for a new upstream connection: `Ok(None)` is plaintext (`mode: optional`
    /// without loadable files); under `mode: required` that is an error.
    pub fn for_dial(&self, cluster: &str) -> Result<Option<Arc<ClientConfig>>, String> {
        match self.current(cluster) {
            None if self.config.mode == TlsMode::Required => Err(format!(
                "cluster {cluster}: tls.mode is required and {}, {} or {} does not load (the log says why)",
                self.config.ca.display(),
                self.config.cert.display(),
                self.config.key.display()
            )),
            current => Ok(current),
        }
    }
}

impl<T> Reloading<T> {
    /// Loads the files once; what failed, if they did not load (then it starts plaintext and
    /// keeps looking at the files).
    fn new(
        name: &str,
        config: &TlsConfig,
        what: &'static str,
        load: fn(&TlsConfig) -> Result<Arc<T>, TlsError>,
    ) -> (Self, Option<TlsError>) {
        let stamp = stamp(config);
        let (current, failed) = match load(config) {
            Ok(c) => {
                tracing::info!(
                    "{what} {name}: mTLS from {} (TLS 1.3, peer {})",
                    config.cert.display(),
                    config.peer_name
                );
                (Some(c), None)
            }
            Err(e) => {
                let then = match config.mode {
                    TlsMode::Required => "refusing connections",
                    _ => "plaintext (tls.mode optional)",
                };
                tracing::warn!("{what} {name}: TLS files not loaded ({e}); {then} until they load");
                (None, Some(e))
            }
        };
        let tls = Reloading {
            config: config.clone(),
            what,
            load,
            state: Mutex::new(State {
                checked: Instant::now(),
                stamp,
                current,
            }),
        };
        (tls, failed)
    }

    /// The setup for a new connection (`None`: plaintext), re-read first when the files
    /// changed since they were last looked at.
    fn current(&self, name: &str) -> Option<Arc<T>> {
        let mut state = self.state.lock();
        let now = Instant::now();
        if now.duration_since(state.checked) >= RECHECK_EVERY {
            state.checked = now;
            let stamp = stamp(&self.config);
            if stamp != state.stamp {
                state.stamp = stamp;
                match (self.load)(&self.config) {
                    Ok(c) => {
                        tracing::info!(
                            "{} {name}: TLS files changed; new connections use them",
                            self.what
                        );
                        state.current = Some(c);
                    }
                    Err(e) if state.current.is_some() => tracing::warn!(
                        "{} {name}: TLS files changed but do not load ({e}); keeping the ones loaded before",
                        self.what
                    ),
                    Err(e) => tracing::warn!(
                        "{} {name}: TLS files still do not load ({e}); {}",
                        self.what,
                        match self.config.mode {
                            TlsMode::Required => "refusing connections",
                            _ => "plaintext (tls.mode optional)",
                        }
                    ),
                }
            }
        }
        state.current.clone()
    }
}

/// When the three files last changed (`None` while one is missing). Kubernetes swaps a
/// secret's files by a symlink: metadata follows it to the new file.
fn stamp(tls: &TlsConfig) -> Option<[SystemTime; 3]> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some([m(&tls.ca)?, m(&tls.cert)?, m(&tls.key)?])
}
