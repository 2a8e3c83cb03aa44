//! Longhorn's mTLS (spec §5) on gRPC listeners and clusters, with certificates made here
//! (rcgen): who is served, who is refused and what the log says, `optional` without files,
//! rotation, lhnet to lhnet, and the manager's TLS-then-plaintext sequence.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lhnet_proto::echo::echo_client::EchoClient;
use lhnet_proto::echo::EchoRequest;
use lhnet_proto::echo_server::{self, RunningEcho};
use lhnet_proto::health::health_client::HealthClient;
use lhnet_proto::health::HealthCheckRequest;
use lhnet_proxy::app::{self, Options, RunningProxy};
use lhnet_proxy::config::{Config, TlsConfig, TlsMode};
use lhnet_proxy::peer;
use lhnet_proxy::tls::{connector, provider, read_certs, read_key, ClientTls, LONGHORN_TLS_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tonic::transport::{Channel, Endpoint};

/// A CA and what it signed, as files: `ca.crt`, `tls.crt` / `tls.key` (DNS SAN
/// longhorn-backend.longhorn-system, both usages, as Longhorn's secret holds), `cn.*` (that
/// name as CN only), `wrong.*` (another SAN).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("lhnet-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        pki.issue("");
        pki
    }

    /// Makes a new CA and its certificates, written over the old files (`prefix` empty) or
    /// beside them as `PREFIX-ca.crt`, ... (a CA nobody trusts).
    fn issue(&self, prefix: &str) {
        let p = |name: &str| match prefix {
            "" => self.dir.join(name),
            _ => self.dir.join(format!("{prefix}-{name}")),
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "lhnet test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |sans: Vec<String>, cn: &str, file: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &issuer).unwrap();
            write_atomically(&p(&format!("{file}.crt")), &cert.pem());
            write_atomically(&p(&format!("{file}.key")), &key.serialize_pem());
        };
        leaf(vec![LONGHORN_TLS_NAME.into()], "longhorn", "tls");
        leaf(vec![], LONGHORN_TLS_NAME, "cn");
        leaf(
            vec!["someone-else.longhorn-system".into()],
            "someone-else",
            "wrong",
        );
        write_atomically(&p("ca.crt"), &ca_cert.pem());
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `tls:` of a listener or cluster on these files.
    fn yaml(&self, mode: &str) -> String {
        format!(
            "{{ mode: {mode}, ca: {}, cert: {}, key: {} }}",
            self.path("ca.crt").display(),
            self.path("tls.crt").display(),
            self.path("tls.key").display()
        )
    }
}

/// As a rotated Kubernetes secret appears: whole, at once.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A client's TLS: the CA to trust, the certificate it presents (none: `None`), the versions
/// it speaks.
fn client_tls(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(read_certs(ca).unwrap());
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert).unwrap(), read_key(key).unwrap())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A gRPC channel over TLS as the manager dials it (ServerName longhorn-backend.longhorn-system).
async fn tls_channel(addr: SocketAddr, tls: Arc<ClientConfig>) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(connector(addr, tls, LONGHORN_TLS_NAME.into()))
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn plain_channel(addr: SocketAddr) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// The manager's first call on a client: `grpc.health.v1.Health/Check` (any service name).
async fn health(channel: Result<Channel, String>) -> Result<(), String> {
    let mut client = HealthClient::new(channel?);
    let request = HealthCheckRequest {
        service: "imrpc.ProxyEngineService".into(),
    };
    let check = client.check(request);
    match tokio::time::timeout(Duration::from_secs(5), check).await {
        Ok(Ok(r)) if r.get_ref().status == 1 => Ok(()),
        Ok(Ok(r)) => Err(format!("status {}", r.get_ref().status)),
        Ok(Err(status)) => Err(format!("{status:?}")),
        Err(_) => Err("no answer in 5 s".into()),
    }
}

/// What the manager does (spec §4): mTLS and a health check; on any failure plaintext and a
/// health check. Which one worked.
async fn manager_connect(addr: SocketAddr, pki: &Pki) -> Result<&'static str, String> {
    let tls = client_tls(
        &pki.path("ca.crt"),
        Some((&pki.path("tls.crt"), &pki.path("tls.key"))),
        &[&rustls::version::TLS13],
    );
    if health(tls_channel(addr, tls).await).await.is_ok() {
        return Ok("tls");
    }
    health(plain_channel(addr).await)
        .await
        .map(|()| "plaintext")
}

async fn proxy(listener_tls: &str, routes: &str, clusters: &str) -> RunningProxy {
    let tls = match listener_tls {
        "" => String::new(),
        t => format!("    tls: {t}\n"),
    };
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\ndrain_timeout: 2s\n\
         listeners:\n  - name: m\n    address: 127.0.0.1:0\n{tls}    routes:\n\
         \x20     - {{ match: {{ prefix: /grpc.health.v1.Health/ }}, local: health }}\n{routes}\
         clusters:\n{clusters}"
    );
    let config = Config::parse(&yaml, "test").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    app::start(config, Options::default()).await.unwrap()
}

async fn metric(p: &RunningProxy, series: &str) -> f64 {
    let text = p.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The log lines of the test's thread (every test here runs on a current-thread runtime).
#[derive(Clone, Default)]
struct Log(Arc<parking_lot::Mutex<Vec<u8>>>);

impl Log {
    fn capture() -> (Log, tracing::subscriber::DefaultGuard) {
        let log = Log::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(log.clone())
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (log, guard)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Log {
    type Writer = Log;

    fn make_writer(&'a self) -> Log {
        self.clone()
    }
}

#[tokio::test]
async fn required_serves_the_right_client_and_refuses_every_other_saying_why() {
    let (log, _guard) = Log::capture();
    let pki = Pki::new("required");
    pki.issue("stranger");
    let p = proxy(&pki.yaml("required"), "", "").await;
    let addr = p.listener_addr("m").unwrap();
    let ca = pki.path("ca.crt");
    let v13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let with =
        |cert: &str, key: &str| client_tls(&ca, Some((&pki.path(cert), &pki.path(key))), v13);

    health(tls_channel(addr, with("tls.crt", "tls.key")).await)
        .await
        .expect("a client with Longhorn's certificate is served");
    health(tls_channel(addr, with("cn.crt", "cn.key")).await)
        .await
        .expect("the name as CN only is accepted (Longhorn's check allows it)");

    let refused: [(&str, Arc<ClientConfig>); 4] = [
        ("no client certificate", client_tls(&ca, None, v13)),
        ("a wrong SAN", with("wrong.crt", "wrong.key")),
        (
            "a certificate of another CA",
            with("stranger-tls.crt", "stranger-tls.key"),
        ),
        (
            "TLS 1.2 only",
            client_tls(
                &ca,
                Some((&pki.path("tls.crt"), &pki.path("tls.key"))),
                &[&rustls::version::TLS12],
            ),
        ),
    ];
    for (what, tls) in refused {
        let result = health(tls_channel(addr, tls).await).await;
        assert!(result.is_err(), "{what}: served");
    }
    assert!(
        health(plain_channel(addr).await).await.is_err(),
        "plaintext on a required listener: served"
    );

    assert_eq!(
        metric(
            &p,
            "lhnet_tls_refused_total{listener=\"m\",reason=\"handshake\"}"
        )
        .await,
        4.0
    );
    assert_eq!(
        metric(
            &p,
            "lhnet_tls_refused_total{listener=\"m\",reason=\"plaintext\"}"
        )
        .await,
        1.0
    );
    let text = log.text();
    // Rate-limited: the first of each reason is logged, and it says why.
    assert!(
        text.contains("TLS handshake with") && text.contains("failed"),
        "{text}"
    );
    assert!(text.contains("did not start TLS"), "{text}");
    p.shutdown().await;
}

#[tokio::test]
async fn each_refusal_names_its_cause_in_the_log() {
    // One proxy per cause: the log is rate-limited per listener and reason.
    let pki = Pki::new("causes");
    pki.issue("stranger");
    let ca = pki.path("ca.crt");
    let v13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let cases: [(&str, Arc<ClientConfig>, &str); 3] = [
        (
            "a wrong SAN",
            client_tls(
                &ca,
                Some((&pki.path("wrong.crt"), &pki.path("wrong.key"))),
                v13,
            ),
            "names DNS:someone-else.longhorn-system, CN=someone-else and not longhorn-backend.longhorn-system",
        ),
        (
            "no client certificate",
            client_tls(&ca, None, v13),
            "certificate",
        ),
        (
            "TLS 1.2 only",
            client_tls(
                &ca,
                Some((&pki.path("tls.crt"), &pki.path("tls.key"))),
                &[&rustls::version::TLS12],
            ),
            "TLS 1.3 only",
        ),
    ];
    for (what, tls, says) in cases {
        let (log, guard) = Log::capture();
        let p = proxy(&pki.yaml("required"), "", "").await;
        let addr = p.listener_addr("m").unwrap();
        assert!(
            health(tls_channel(addr, tls).await).await.is_err(),
            "{what}"
        );
        // The listener's task logs once it has seen the client's side fail.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let text = log.text();
        assert!(
            text.to_lowercase().contains(&says.to_lowercase()),
            "{what}: the log does not say {says:?}:\n{text}"
        );
        p.shutdown().await;
        drop(guard);
    }
}

#[tokio::test]
async fn a_client_stalled_mid_handshake_is_closed_and_others_are_served() {
    let pki = Pki::new("stall");
    let listener_tls = pki.yaml("required");
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\n\
         listeners:\n  - name: m\n    address: 127.0.0.1:0\n    request_headers_timeout: 1s\n    tls: {listener_tls}\n    routes:\n\
         \x20     - {{ match: {{ prefix: / }}, local: health }}\n"
    );
    let p = app::start(Config::parse(&yaml, "t").unwrap(), Options::default())
        .await
        .unwrap();
    let addr = p.listener_addr("m").unwrap();
    // A handshake record header promising 300 bytes, then nothing.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stalled, &[0x16, 0x03, 0x01, 0x01, 0x2c, 0x01])
        .await
        .unwrap();
    health(
        tls_channel(
            addr,
            client_tls(
                &pki.path("ca.crt"),
                Some((&pki.path("tls.crt"), &pki.path("tls.key"))),
                &[&rustls::version::TLS13],
            ),
        )
        .await,
    )
    .await
    .expect("served while another client stalls in its handshake");
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut stalled, &mut buf),
    )
    .await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the stalled handshake is closed after request_headers_timeout: {closed:?}"
    );
    let timed_out = metric(
        &p,
        "lhnet_limits_reached_total{limit=\"request_headers_timeout\",listener=\"m\"}",
    )
    .await;
    assert_eq!(timed_out, 1.0, "{}", p.metrics().render());
    p.shutdown().await;
}

#[tokio::test]
async fn optional_without_files_serves_plaintext_and_the_manager_falls_back() {
    let (log, _guard) = Log::capture();
    let pki = Pki::new("optional");
    let absent = "{ mode: optional, ca: /nonexistent/ca.crt, cert: /nonexistent/tls.crt, key: /nonexistent/tls.key }";
    let p = proxy(absent, "", "").await;
    let addr = p.listener_addr("m").unwrap();
    assert_eq!(manager_connect(addr, &pki).await, Ok("plaintext"));
    assert!(
        log.text().contains("TLS files not loaded") && log.text().contains("/nonexistent/ca.crt"),
        "{}",
        log.text()
    );
    p.shutdown().await;

    // And each mode as the manager meets it.
    for (tls, expected) in [
        (pki.yaml("required"), "tls"),
        (pki.yaml("optional"), "tls"),
        (pki.yaml("off"), "plaintext"),
        (String::new(), "plaintext"),
    ] {
        let p = proxy(&tls, "", "").await;
        let addr = p.listener_addr("m").unwrap();
        assert_eq!(
            manager_connect(addr, &pki).await,
            Ok(expected),
            "tls: {tls}"
        );
        p.shutdown().await;
    }
}

#[tokio::test]
async fn required_without_files_does_not_start() {
    let yaml = "admin: { address: 127.0.0.1:0 }\nstorage_network: { interface: lo }\n\
         listeners:\n  - name: m\n    address: 127.0.0.1:0\n    tls: { mode: required, ca: /nonexistent/ca.crt }\n    routes:\n\
         \x20     - { match: { prefix: / }, local: health }\n";
    let err = match app::start(Config::parse(yaml, "t").unwrap(), Options::default()).await {
        Ok(_) => panic!("started without its TLS files"),
        Err(e) => e,
    };
    assert!(
        err.contains("listener m") && err.contains("/nonexistent/ca.crt"),
        "{err}"
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_used_by_new_connections_while_old_ones_go_on() {
    let pki = Pki::new("rotate");
    let p = proxy(&pki.yaml("required"), "", "").await;
    let addr = p.listener_addr("m").unwrap();
    let old_identity = client_tls(
        &pki.path("ca.crt"),
        Some((&pki.path("tls.crt"), &pki.path("tls.key"))),
        &[&rustls::version::TLS13],
    );
    let old = tls_channel(addr, old_identity.clone()).await.unwrap();
    health(Ok(old.clone())).await.unwrap();

    // The secret rotates: a new CA and certificates.
    pki.issue("");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new_identity = client_tls(
        &pki.path("ca.crt"),
        Some((&pki.path("tls.crt"), &pki.path("tls.key"))),
        &[&rustls::version::TLS13],
    );
    health(tls_channel(addr, new_identity).await)
        .await
        .expect("a new connection with the new certificate");
    assert!(
        health(tls_channel(addr, old_identity).await).await.is_err(),
        "a new connection with the old certificate is refused"
    );
    health(Ok(old))
        .await
        .expect("the connection made before the rotation goes on");

    // A rotation to files that do not load keeps the last good ones.
    let current = client_tls(
        &pki.path("ca.crt"),
        Some((&pki.path("tls.crt"), &pki.path("tls.key"))),
        &[&rustls::version::TLS13],
    );
    std::fs::write(pki.path("tls.key"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    health(tls_channel(addr, current).await)
        .await
        .expect("still served with the files loaded before the broken rotation");
    p.shutdown().await;
}

/// One unary echo call through the proxy's listener `m`, in plaintext.
async fn echo_through(front: &RunningProxy, payload: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let channel = plain_channel(front.listener_addr("m").unwrap())
        .await
        .unwrap();
    let request = EchoRequest {
        payload: payload.to_vec(),
        count: 0,
        delay_ms: 0,
    };
    let reply = EchoClient::new(channel).unary(request).await?;
    Ok(reply.into_inner().payload)
}

async fn echo(name: &str) -> RunningEcho {
    echo_server::spawn("127.0.0.1:0".parse().unwrap(), name)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_cluster_speaks_mtls_to_a_peer_lhnet() {
    let pki = Pki::new("cluster");
    let upstream = echo("behind-the-peer").await;
    let echo_route = |cluster: &str| {
        format!("      - {{ match: {{ prefix: /lhnet.echo.v1.Echo/ }}, cluster: {cluster} }}\n")
    };
    let peer = proxy(
        &pki.yaml("required"),
        &echo_route("echo"),
        &format!(
            "  - {{ name: echo, endpoints: [{}], upstream_bind_config: {{ source_address: none }} }}\n",
            upstream.addr
        ),
    )
    .await;
    let peer_addr = peer.listener_addr("m").unwrap();
    let cluster = |tls: &str| {
        format!(
            "  - {{ name: peer, endpoints: [{peer_addr}], connect_timeout: 2s, upstream_bind_config: {{ source_address: none }}, tls: {tls} }}\n"
        )
    };
    let front = proxy("", &echo_route("peer"), &cluster(&pki.yaml("required"))).await;
    let reply = echo_through(&front, b"over mtls")
        .await
        .expect("through lhnet's mTLS cluster to the peer lhnet");
    assert_eq!(reply, b"over mtls");
    assert_eq!(
        metric(
            &peer,
            "lhnet_tls_refused_total{listener=\"m\",reason=\"handshake\"}"
        )
        .await,
        0.0
    );
    front.shutdown().await;

    // The wrong client certificate: the peer refuses it, and the call says TLS failed.
    let wrong = format!(
        "{{ mode: required, ca: {}, cert: {}, key: {} }}",
        pki.path("ca.crt").display(),
        pki.path("wrong.crt").display(),
        pki.path("wrong.key").display()
    );
    let front = proxy("", &echo_route("peer"), &cluster(&wrong)).await;
    let status = echo_through(&front, b"x").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    front.shutdown().await;

    // Required and files that do not load: every dial fails, naming the files.
    let front = proxy(
        "",
        &echo_route("peer"),
        &cluster("{ mode: required, ca: /nonexistent/ca.crt }"),
    )
    .await;
    let status = echo_through(&front, b"x").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("/nonexistent/ca.crt"),
        "{status:?}"
    );
    front.shutdown().await;
    peer.shutdown().await;
}

#[tokio::test]
async fn peer_lookups_speak_mtls_to_a_listener_that_has_it() {
    let pki = Pki::new("peer");
    let peer_route = "      - { match: { prefix: /lhnet.v1.Peer/ }, local: peer }\n";
    let p = proxy(&pki.yaml("required"), peer_route, "").await;
    let addr = p.listener_addr("m").unwrap();
    let config = TlsConfig {
        mode: TlsMode::Required,
        ca: pki.path("ca.crt"),
        cert: pki.path("tls.crt"),
        key: pki.path("tls.key"),
        peer_name: LONGHORN_TLS_NAME.into(),
    };
    let tls = ClientTls::for_cluster("peer_lookup", &config);
    let answer = peer::ask(addr, Duration::from_secs(2), Some(&tls))
        .await
        .expect("a lookup with peer_lookup.tls");
    assert_eq!(answer.storage.to_string(), "127.0.0.1");
    let plain = peer::ask(addr, Duration::from_secs(2), None).await;
    assert!(
        plain.is_err(),
        "a plaintext lookup of an mTLS listener: {plain:?}"
    );
    p.shutdown().await;
}
