//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz) and for the test that replays
//! their committed corpus on stable (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes and
//! must return, whatever they are, without panicking; what a function returns is ignored.
//!
//! Nothing here reaches the network beyond loopback: the engine-proxy target dials through a
//! cluster that allows only 127.0.0.1:1 (refused at once), asks no peer, and leaves out the
//! calls that read backup targets (their URLs and files have targets of their own here).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use tonic::codegen::Service;

use crate::body::{GrpcRequestBody, Verdict};
use crate::config::Config;
use lhnet_proto::imrpc::proxy_engine_service_server::ProxyEngineServiceServer;

/// The config parser, from the bytes a file would hold (size and UTF-8 checks included).
pub fn config(data: &[u8]) {
    let _ = Config::from_bytes(data.to_vec(), "fuzz");
}

/// The wire rewrite of the instance-manager's instance messages (`stack::instances`): the
/// first byte picks a method, the rest is its request or answer message. Whatever the bytes,
/// a rewrite that changes nothing gives back exactly the bytes it was given, and a rewrite
/// that maps every address gives a message that walks the same way.
pub fn instance_messages(data: &[u8]) {
    use crate::stack::instances::{rewrite, METHODS};
    let Some((&pick, message)) = data.split_first() else {
        return;
    };
    let (_, request, response) = METHODS[usize::from(pick) % METHODS.len()];
    for fields in [request.unwrap_or(response), response] {
        if let Some(same) = rewrite(message, fields, &mut |_, _| None) {
            assert_eq!(
                same, message,
                "a rewrite that maps nothing changed the message"
            );
            let mapped = rewrite(message, fields, &mut |text, _| {
                Some(text.replace(|c: char| c.is_ascii_digit(), "7"))
            });
            let mapped = mapped.expect("a message that walked once walks again");
            assert!(rewrite(&mapped, fields, &mut |_, _| None).is_some());
        }
    }
}

/// Multus' network-status annotation (a file's text).
pub fn network_status(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lhnet_netns::network_status::parse_network_status(text);
    }
}

/// Every parser of an address, URL or header value lhnet takes from outside: engine and
/// replica addresses, grpc-timeout, durations, capture redirects, the storage-network name,
/// backup-target URLs (vfs, NFS, CIFS, S3, Azure) and backup URLs, the destination policy
/// over host names and allowed_endpoints entries.
pub fn addresses(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    use crate::engine_proxy::address::{parse_address, EngineAddr, ReplicaAddr};
    let _ = parse_address("address", text);
    let _ = EngineAddr::parse("address", text);
    if let Ok(replica) = ReplicaAddr::parse("replica_address", text) {
        let _ = (replica.sync_agent(), replica.url());
    }
    let _ = crate::route::parse_grpc_timeout(text);
    let _ = crate::reply::quote_short(text);
    let _ = crate::config::parse_duration(text);
    let _ = crate::inject::capture::parse_redirect(text);
    let _ = crate::inject::parse_storage_network(text);
    let _ = lhnet_backupstore::Target::parse_with(text, std::path::Path::new("/nonexistent"));
    let _ = lhnet_backupstore::decode_backup_url(text);
    let _ = lhnet_backupstore::driver::parse_nfs(text);
    let _ = lhnet_backupstore::s3::S3Url::parse(text);
    let _ = lhnet_backupstore::azblob::AzblobUrl::parse(text);
    let _ = lhnet_backupstore::driver::parse_cifs(text);
    // A caller's host names and the operator's allowed_endpoints entries.
    let policy = lhnet_backupstore::EndpointPolicy::default();
    let _ = policy.check(lhnet_backupstore::endpoints::Destination {
        key: "AWS_ENDPOINTS",
        host: text,
        port: 443,
    });
    let _ = lhnet_backupstore::EndpointPolicy::new(&[text.to_string()], false);
    let _ = lhnet_backupstore::endpoints::excerpt(text, 16);
}

/// The gRPC frame checker over a request body cut into chunks where the input says: the
/// first byte picks the largest message allowed and whether compression is allowed, then
/// each chunk is a length byte and that many bytes.
pub fn grpc_frames(data: &[u8]) {
    let Some((&head, mut rest)) = data.split_first() else {
        return;
    };
    let mut chunks = Vec::new();
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        chunks.push(Ok::<_, std::convert::Infallible>(http_body::Frame::data(
            Bytes::copy_from_slice(&tail[..n]),
        )));
        rest = &tail[n..];
    }
    let max = 1usize << (head & 0x0f);
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let checked = GrpcRequestBody::new(body, max, head & 0x10 != 0, Verdict::default());
    runtime().block_on(async {
        let _ = checked.collect().await;
    });
}

/// One `imrpc.ProxyEngineService` call through lhnet's own server (tonic's decoder, then the
/// handler): the first byte picks the method, the rest is the request message's bytes.
pub fn engine_request(data: &[u8]) {
    let Some((&pick, message)) = data.split_first() else {
        return;
    };
    let engine = engine();
    let Some(method) = engine
        .methods
        .get(pick as usize % engine.methods.len().max(1))
    else {
        return;
    };
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    let request = Request::builder()
        .method("POST")
        .uri(format!("http://lhnet/imrpc.ProxyEngineService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(framed)))
        .expect("a valid request");
    let mut server = engine.server.clone();
    runtime().block_on(async {
        let call = async {
            let Ok(response) = server.call(request).await;
            let _ = response.into_body().collect().await;
        };
        // Each call is bounded: a handler that waits on the (refused) engine ends here.
        let _ = tokio::time::timeout(Duration::from_secs(2), call).await;
    });
}

/// A Kubernetes AdmissionReview, as the webhook receives it.
pub fn admission_review(data: &[u8]) {
    let _ = crate::inject::webhook::review(data, &crate::inject::InjectOptions::default());
}

/// A backup target's `volume.cfg` and `backup.cfg` JSON.
pub fn backupstore_cfg(data: &[u8]) {
    let _ = serde_json::from_slice::<lhnet_backupstore::VolumeCfg>(data);
    let _ = serde_json::from_slice::<lhnet_backupstore::BackupCfg>(data);
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

struct Engine {
    server: ProxyEngineServiceServer<crate::address_map::MappedEngineProxy>,
    /// ProxyEngineService's methods but the ones that read backup targets.
    methods: Vec<String>,
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let config = Config::parse(
            "listeners: []\nstorage_network: { interface: lo }\npeer_lookup: { enabled: false }\n\
             backup_target: { nfs_mount: existing, nfs_mount_root: /nonexistent }\n\
             clusters:\n  - { name: engines, type: original_dst, connect_timeout: 100ms, \
             allowed_destinations: [127.0.0.1/32], allowed_ports: [1] }\n",
            "fuzz",
        )
        .expect("the fuzz config parses");
        // The cluster's idle reaper and the engine calls run on the fuzz runtime.
        let _entered = runtime().enter();
        let metrics = crate::metrics::Metrics::new();
        let storage =
            crate::storage::StorageState::new(&config.storage_network, None, metrics.clone());
        let cluster =
            crate::cluster::Cluster::new(config.clusters[0].clone(), storage.clone(), metrics);
        let proxy = crate::engine_proxy::EngineProxy::new(
            Arc::clone(&cluster),
            crate::engine_proxy::BackupTargets::new(&config.backup_target),
            None,
        );
        let server = crate::address_map::MappedEngineProxy::server(
            proxy,
            crate::address_map::AddressMap::new(storage, &config),
        )
        .max_decoding_message_size(crate::config::DEFAULT_MAX_MESSAGE_SIZE);
        let methods = proxy_engine_methods()
            .into_iter()
            .filter(|m| !m.contains("Backup"))
            .collect();
        Engine { server, methods }
    })
}

fn proxy_engine_methods() -> Vec<String> {
    use prost::Message;
    let Ok(set) = prost_types::FileDescriptorSet::decode(lhnet_proto::FILE_DESCRIPTOR_SET) else {
        return Vec::new();
    };
    set.file
        .iter()
        .filter(|f| f.package() == "imrpc")
        .flat_map(|f| &f.service)
        .filter(|s| s.name() == "ProxyEngineService")
        .flat_map(|s| &s.method)
        .map(|m| m.name().to_string())
        .collect()
}
