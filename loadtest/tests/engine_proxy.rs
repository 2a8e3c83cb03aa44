//! imrpc.ProxyEngineService through the real lhnet-proxy, against the simulated engine and
//! replicas on real sockets.

use std::net::SocketAddr;

use lhnet_loadtest::sim::{self, RunningEngine, RunningReplica};
use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes::controller_service_client::ControllerServiceClient;
use lhnet_proto::ptypes::{self, ReplicaMode};
use lhnet_proxy::app::{self, Options, RunningProxy};
use lhnet_proxy::config::Config;
use tonic::transport::Channel;
use tonic::Code;

mod common;

const SIZE: i64 = 64 << 20;

struct Setup {
    _proxy: RunningProxy,
    client: ProxyEngineServiceClient<Channel>,
    engine: RunningEngine,
    replicas: Vec<RunningReplica>,
}

async fn start_proxy() -> (RunningProxy, ProxyEngineServiceClient<Channel>) {
    let yaml = "admin: { address: 127.0.0.1:0 }\nstorage_network: { interface: lo }\n\
        listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n\
        \x20     - match: { prefix: /imrpc.ProxyEngineService/ }\n        local: longhorn_engine_proxy\n\
        clusters:\n  - name: engines\n    type: original_dst\n    upstream_bind_config: { source_address: storage }\n\
        \x20   allowed_destinations: [127.0.0.1]\n    connect_timeout: 1s\n";
    let config = Config::parse(yaml, "test").unwrap();
    let proxy = app::start(config, Options::default()).await.unwrap();
    let addr = proxy.listener_addr("m").unwrap();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (proxy, ProxyEngineServiceClient::new(channel))
}

async fn setup() -> Setup {
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(sim::start_replica(local, SIZE).await.unwrap());
    }
    let urls = replicas.iter().map(|r| r.url()).collect();
    let engine = sim::start_engine(local, "vol-a", SIZE, urls).await.unwrap();
    let (proxy, client) = start_proxy().await;
    Setup {
        _proxy: proxy,
        client,
        engine,
        replicas,
    }
}

fn req(addr: SocketAddr) -> ProxyEngineRequest {
    ProxyEngineRequest {
        address: addr.to_string(),
    }
}

fn some_req(addr: SocketAddr) -> Option<ProxyEngineRequest> {
    Some(req(addr))
}

#[tokio::test]
async fn volume_calls_reach_the_engine() {
    let mut s = setup().await;
    let e = s.engine.served.addr;

    let v = s
        .client
        .server_version_get(req(e))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(
        (
            v.version.as_str(),
            v.cli_api_version,
            v.controller_api_version
        ),
        ("v1.3.3-lhnet-sim", 5, 3)
    );
    s.client.ping(()).await.unwrap();

    let vol = s
        .client
        .volume_get(req(e))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (
            vol.name.as_str(),
            vol.size,
            vol.replica_count,
            vol.frontend_state.as_str()
        ),
        ("vol-a", SIZE, 2, "down")
    );

    // The three address forms Longhorn uses all work.
    for form in [format!("tcp://{e}"), format!("http://{e}/v1")] {
        let vol = s
            .client
            .volume_get(ProxyEngineRequest { address: form })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(vol.volume.unwrap().name, "vol-a");
    }

    let start = EngineVolumeFrontendStartRequest {
        proxy_engine_request: some_req(e),
        frontend_start: Some(ptypes::VolumeFrontendStartRequest {
            frontend: "tgt-blockdev".into(),
        }),
    };
    s.client.volume_frontend_start(start.clone()).await.unwrap();
    let vol = s
        .client
        .volume_get(req(e))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (vol.frontend_state.as_str(), vol.endpoint.as_str()),
        ("up", "/dev/longhorn/vol-a")
    );
    // The engine's own error comes back with its text.
    let err = s.client.volume_frontend_start(start).await.unwrap_err();
    assert_eq!(err.code(), Code::Unknown);
    assert!(err.message().contains("frontend is already up"), "{err:?}");
    s.client.volume_frontend_shutdown(req(e)).await.unwrap();

    let expand = |size| EngineVolumeExpandRequest {
        proxy_engine_request: some_req(e),
        expand: Some(ptypes::VolumeExpandRequest { size }),
    };
    s.client.volume_expand(expand(2 * SIZE)).await.unwrap();
    assert_eq!(
        s.client
            .volume_get(req(e))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .size,
        2 * SIZE
    );
    let err = s.client.volume_expand(expand(SIZE)).await.unwrap_err();
    assert!(
        err.message()
            .starts_with(&format!("failed to expand volume {e}: cannot shrink")),
        "{err:?}"
    );
}

#[tokio::test]
async fn snapshots_list_revert_and_remove() {
    let mut s = setup().await;
    let e = s.engine.served.addr;
    let snap = |name: &str| EngineVolumeSnapshotRequest {
        proxy_engine_request: some_req(e),
        snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
            name: name.into(),
            labels: [("k".to_string(), "v".to_string())].into(),
        }),
    };
    assert_eq!(
        s.client
            .volume_snapshot(snap("s1"))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
            .name,
        "s1"
    );
    s.client.volume_snapshot(snap("s2")).await.unwrap();
    let generated = s
        .client
        .volume_snapshot(snap(""))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .name;
    assert_eq!(
        generated.len(),
        36,
        "engine-generated names look like UUIDs: {generated}"
    );
    for r in &s.replicas {
        assert_eq!(r.replica.snapshots().len(), 3);
    }

    let disks = s
        .client
        .snapshot_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .disks;
    let mut names: Vec<&str> = disks.keys().map(String::as_str).collect();
    names.sort();
    let mut want = vec!["s1", "s2", generated.as_str(), "volume-head"];
    want.sort();
    assert_eq!(names, want);
    assert_eq!(disks["s2"].parent, "s1");
    assert!(disks["s1"].children.contains_key("s2"));
    assert_eq!(disks["volume-head"].parent, generated);
    assert_eq!(disks["s1"].labels["k"], "v");
    assert!(disks["s1"].user_created);

    let revert = |name: &str| EngineSnapshotRevertRequest {
        proxy_engine_request: some_req(e),
        name: name.into(),
    };
    let err = s
        .client
        .snapshot_revert(revert("volume-head"))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("cannot revert to the volume head"),
        "{err:?}"
    );
    s.client.snapshot_revert(revert("s1")).await.unwrap();
    let disks = s
        .client
        .snapshot_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .disks;
    assert_eq!(disks["volume-head"].parent, "s1");

    let remove = EngineSnapshotRemoveRequest {
        proxy_engine_request: some_req(e),
        names: vec!["s2".into()],
    };
    s.client.snapshot_remove(remove).await.unwrap();
    let disks = s
        .client
        .snapshot_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .disks;
    assert!(disks["s2"].removed && !disks["s1"].removed);
    // The last error is returned when one of the names fails.
    let remove = EngineSnapshotRemoveRequest {
        proxy_engine_request: some_req(e),
        names: vec!["s1".into(), "nope".into()],
    };
    let err = s.client.snapshot_remove(remove).await.unwrap_err();
    assert!(
        err.message().contains("cannot find snapshot nope"),
        "{err:?}"
    );
}

#[tokio::test]
async fn replica_calls_and_status_fan_out() {
    let mut s = setup().await;
    let e = s.engine.served.addr;
    let list = s
        .client
        .replica_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .replica_list
        .unwrap()
        .replicas;
    let urls: Vec<String> = list
        .iter()
        .map(|r| r.address.clone().unwrap().address)
        .collect();
    assert_eq!(urls, s.replicas.iter().map(|r| r.url()).collect::<Vec<_>>());
    assert!(list.iter().all(|r| r.mode == ReplicaMode::Rw as i32));

    let purge = s
        .client
        .snapshot_purge_status(req(e))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(purge.len(), 2);
    assert!(purge.values().all(|p| !p.is_purging && p.error.is_empty()));
    assert_eq!(
        s.client
            .snapshot_clone_status(req(e))
            .await
            .unwrap()
            .into_inner()
            .status
            .len(),
        2
    );
    assert_eq!(
        s.client
            .backup_restore_status(req(e))
            .await
            .unwrap()
            .into_inner()
            .status
            .len(),
        2
    );
    // Only WO replicas are rebuilding.
    assert!(s
        .client
        .replica_rebuilding_status(req(e))
        .await
        .unwrap()
        .into_inner()
        .status
        .is_empty());

    // A third replica added WO (as ReplicaAdd does) shows in rebuild status, then verify makes it RW.
    let third = sim::start_replica("127.0.0.1:0".parse().unwrap(), SIZE)
        .await
        .unwrap();
    let mut controller = ControllerServiceClient::connect(format!("http://{e}"))
        .await
        .unwrap();
    controller
        .controller_replica_create(ptypes::ControllerReplicaCreateRequest {
            address: third.url(),
            snapshot_required: true,
            mode: ReplicaMode::Wo as i32,
        })
        .await
        .unwrap();
    let rebuilding = s
        .client
        .replica_rebuilding_status(req(e))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(rebuilding.keys().collect::<Vec<_>>(), vec![&third.url()]);
    let verify = EngineReplicaVerifyRebuildRequest {
        proxy_engine_request: some_req(e),
        replica_address: third.url(),
    };
    s.client
        .replica_verify_rebuild(verify.clone())
        .await
        .unwrap();
    let err = s.client.replica_verify_rebuild(verify).await.unwrap_err();
    assert!(err.message().contains("not WO"), "{err:?}");

    // A replica whose process is gone: its entry carries the error, the call still succeeds.
    let third_url = third.url();
    drop(third);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let purge = s
        .client
        .snapshot_purge_status(req(e))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(purge.len(), 3);
    let gone = &purge[&third_url].error;
    assert!(
        gone.starts_with(&format!(
            "failed to get snapshot purge status of {third_url}"
        )),
        "{gone}"
    );
    assert!(purge
        .iter()
        .filter(|(k, _)| **k != third_url)
        .all(|(_, p)| p.error.is_empty()));

    let remove = |a: String| EngineReplicaRemoveRequest {
        proxy_engine_request: some_req(e),
        replica_address: a,
    };
    s.client
        .replica_remove(remove(s.replicas[1].url()))
        .await
        .unwrap();
    let err = s
        .client
        .replica_remove(remove(s.replicas[1].url()))
        .await
        .unwrap_err();
    assert!(err.message().contains("cannot find replica"), "{err:?}");
    assert_eq!(
        s.client
            .volume_get(req(e))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .replica_count,
        2
    );
}

#[tokio::test]
async fn engine_down_is_unavailable_with_the_go_text_shape() {
    let (_proxy, mut client) = start_proxy().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = client.volume_get(req(dead)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .starts_with(&format!("failed to get volume {dead}: ")),
        "{err:?}"
    );
}

#[tokio::test]
async fn forbidden_and_malformed_addresses_are_refused_before_any_dial() {
    let mut s = setup().await;
    // An engine outside allowed_destinations (127.0.0.1 only).
    let outside = sim::start_engine("127.0.0.2:0".parse().unwrap(), "vol-x", SIZE, vec![])
        .await
        .unwrap();
    let err = s
        .client
        .volume_get(req(outside.served.addr))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not dialled"), "{err:?}");
    assert_eq!(outside.served.accepted(), 0);

    // A replica address outside the allowed set, named in a request.
    let verify = EngineReplicaVerifyRebuildRequest {
        proxy_engine_request: some_req(s.engine.served.addr),
        replica_address: "tcp://127.0.0.3:10000".into(),
    };
    assert_eq!(
        s.client
            .replica_verify_rebuild(verify)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    for bad in ["", "engine-a:9501", "tcp://10.0.0.1"] {
        let err = s
            .client
            .volume_get(ProxyEngineRequest {
                address: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert!(err.message().contains("address"), "{err:?}");
    }
}

#[tokio::test]
async fn a_thousand_calls_reuse_a_handful_of_engine_connections() {
    let mut s = setup().await;
    let e = s.engine.served.addr;
    for _ in 0..1000 {
        s.client.volume_get(req(e)).await.unwrap();
    }
    let accepted = s.engine.served.accepted();
    assert!(
        accepted <= 4,
        "{accepted} engine connections for 1000 VolumeGet calls"
    );
}

#[tokio::test]
async fn a_malformed_request_body_is_invalid_argument_and_the_proxy_keeps_serving() {
    let mut s = setup().await;
    let e = s.engine.served.addr;
    // Raw bytes that are not a ProxyEngineRequest (field 1 declared as a 100-byte string, 2 given).
    let mut raw_client = tonic::client::Grpc::new(
        Channel::from_shared(format!("http://{}", s._proxy.listener_addr("m").unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    raw_client.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/imrpc.ProxyEngineService/VolumeGet");
    let err = raw_client
        .unary::<_, ProxyEngineRequest, _>(
            tonic::Request::new(RawBytes(vec![0x0a, 100, b'x', b'y'])),
            path,
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    s.client.volume_get(req(e)).await.unwrap();
}

#[derive(Clone)]
struct RawBytes(Vec<u8>);

/// Encodes raw bytes as they are; decodes replies as ProxyEngineRequest (never reached).
#[derive(Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = RawBytes;
    type Decode = ProxyEngineRequest;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<ProxyEngineRequest>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = RawBytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: RawBytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item.0);
        Ok(())
    }
}

fn add(engine: SocketAddr, replica: String, restore: bool) -> EngineReplicaAddRequest {
    EngineReplicaAddRequest {
        proxy_engine_request: some_req(engine),
        replica_address: replica,
        restore,
        size: SIZE,
        current_size: SIZE,
    }
}

#[tokio::test]
async fn replica_add_rebuilds_a_spare_with_the_same_bytes() {
    let mut s = setup().await;
    let e = s.engine.served.addr;
    // The engine's data path writes every block to each RW replica.
    let block: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8 + 1).collect();
    for r in &s.replicas {
        r.replica.write(0, &block).unwrap();
    }
    let snap = EngineVolumeSnapshotRequest {
        proxy_engine_request: some_req(e),
        snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
            name: "before-add".into(),
            labels: Default::default(),
        }),
    };
    s.client.volume_snapshot(snap).await.unwrap();
    for r in &s.replicas {
        r.replica.write(1 << 20, &block[..4096]).unwrap();
    }

    let spare = sim::start_replica("127.0.0.1:0".parse().unwrap(), SIZE)
        .await
        .unwrap();
    s.client
        .replica_add(add(e, spare.url(), false))
        .await
        .unwrap();

    let list = s
        .client
        .replica_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .replica_list
        .unwrap()
        .replicas;
    let mode_of = |url: &str| {
        list.iter()
            .find(|r| r.address.as_ref().unwrap().address == url)
            .map(|r| r.mode)
    };
    assert_eq!(mode_of(&spare.url()), Some(ReplicaMode::Rw as i32));
    // The spare holds the same bytes as the source, layer by layer, copied over TCP.
    assert_eq!(spare.replica.read(0, block.len()), block);
    assert_eq!(
        spare.replica.read(1 << 20, 4096),
        s.replicas[0].replica.read(1 << 20, 4096)
    );
    let source_snaps = s.replicas[0].replica.snapshots();
    assert_eq!(spare.replica.snapshots(), source_snaps);
    assert!(source_snaps.contains(&"volume-snap-before-add.img".to_string()));
    let status = s
        .client
        .replica_rebuilding_status(req(e))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert!(status.is_empty(), "no WO replica is left: {status:?}");
    // The manager's view: three replicas, SnapshotList still answers.
    assert_eq!(
        s.client
            .volume_get(req(e))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .replica_count,
        3
    );
    assert!(s
        .client
        .snapshot_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .disks
        .contains_key("before-add"));
}

#[tokio::test]
async fn replica_add_starts_an_empty_volume_and_adds_restore_replicas() {
    let (_proxy, mut client) = start_proxy().await;
    let engine = sim::start_engine("127.0.0.1:0".parse().unwrap(), "vol-new", SIZE, vec![])
        .await
        .unwrap();
    let e = engine.served.addr;
    let first = sim::start_replica("127.0.0.1:0".parse().unwrap(), SIZE)
        .await
        .unwrap();
    client
        .replica_add(add(e, first.url(), false))
        .await
        .unwrap();
    let list = client
        .replica_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .replica_list
        .unwrap()
        .replicas;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].mode, ReplicaMode::Rw as i32);

    let small = sim::start_replica("127.0.0.1:0".parse().unwrap(), SIZE / 2)
        .await
        .unwrap();
    let err = client
        .replica_add(add(e, small.url(), true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let same = sim::start_replica("127.0.0.1:0".parse().unwrap(), SIZE)
        .await
        .unwrap();
    client.replica_add(add(e, same.url(), true)).await.unwrap();
    let list = client
        .replica_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .replica_list
        .unwrap()
        .replicas;
    assert_eq!(
        list.iter()
            .filter(|r| r.mode == ReplicaMode::Wo as i32)
            .count(),
        1
    );
}

#[tokio::test]
async fn replica_add_fails_clearly_when_the_target_sync_agent_is_gone() {
    let mut s = setup().await;
    let e = s.engine.served.addr;
    let spare = sim::start_replica("127.0.0.1:0".parse().unwrap(), SIZE)
        .await
        .unwrap();
    let url = spare.url();
    let RunningReplica {
        replica: _replica,
        service: _service,
        data: _data,
        sync_agent,
    } = spare;
    drop(sync_agent);
    let err = s
        .client
        .replica_add(add(e, url.clone(), false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&format!("to {url}")), "{err:?}");
    // The engine keeps it WO (not RW): the manager sees a rebuild that did not finish.
    let list = s
        .client
        .replica_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .replica_list
        .unwrap()
        .replicas;
    let mode = list
        .iter()
        .find(|r| r.address.as_ref().unwrap().address == url)
        .map(|r| r.mode);
    assert_eq!(mode, Some(ReplicaMode::Wo as i32));
}

#[tokio::test]
async fn snapshot_purge_coalesces_removed_snapshots_and_keeps_the_bytes() {
    let mut s = setup().await;
    let e = s.engine.served.addr;
    for (i, name) in ["p1", "p2", "p3"].iter().enumerate() {
        for r in &s.replicas {
            r.replica.write(i * 8192, &[i as u8 + 1; 8192]).unwrap();
        }
        let snap = EngineVolumeSnapshotRequest {
            proxy_engine_request: some_req(e),
            snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
                name: name.to_string(),
                labels: Default::default(),
            }),
        };
        s.client.volume_snapshot(snap).await.unwrap();
    }
    let before = s.replicas[0].replica.read(0, 3 * 8192);
    let remove = EngineSnapshotRemoveRequest {
        proxy_engine_request: some_req(e),
        names: vec!["p1".into(), "p2".into()],
    };
    s.client.snapshot_remove(remove).await.unwrap();

    let purge = |skip| EngineSnapshotPurgeRequest {
        proxy_engine_request: some_req(e),
        skip_if_in_progress: skip,
    };
    s.client.snapshot_purge(purge(false)).await.unwrap();
    // While it runs: skipping is fine, insisting is refused.
    s.client.snapshot_purge(purge(true)).await.unwrap();
    let err = s.client.snapshot_purge(purge(false)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let mut saw_progress = false;
    for _ in 0..100 {
        let status = s
            .client
            .snapshot_purge_status(req(e))
            .await
            .unwrap()
            .into_inner()
            .status;
        if status
            .values()
            .all(|p| !p.is_purging && p.state == "complete")
        {
            break;
        }
        saw_progress |= status
            .values()
            .any(|p| p.is_purging && p.state == "in_progress");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(saw_progress, "the purge never showed as in progress");
    let status = s
        .client
        .snapshot_purge_status(req(e))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert!(
        status
            .values()
            .all(|p| p.state == "complete" && p.progress == 100),
        "{status:?}"
    );

    let disks = s
        .client
        .snapshot_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .disks;
    assert!(
        !disks.contains_key("p1") && !disks.contains_key("p2"),
        "{:?}",
        disks.keys()
    );
    assert_eq!(disks["p3"].parent, "");
    for r in &s.replicas {
        assert_eq!(
            r.replica.read(0, 3 * 8192),
            before,
            "purge changed what the volume reads"
        );
    }
}

#[tokio::test]
async fn snapshot_clone_copies_a_snapshot_between_volumes() {
    let mut s = setup().await;
    let source = s.engine.served.addr;
    let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 200) as u8 + 1).collect();
    for r in &s.replicas {
        r.replica.write(4096, &data).unwrap();
    }
    let snap = EngineVolumeSnapshotRequest {
        proxy_engine_request: some_req(source),
        snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
            name: "golden".into(),
            labels: Default::default(),
        }),
    };
    s.client.volume_snapshot(snap).await.unwrap();
    // Written after the snapshot: must not travel.
    for r in &s.replicas {
        r.replica.write(0, &[9u8; 4096]).unwrap();
    }

    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let t1 = sim::start_replica(local, SIZE).await.unwrap();
    let t2 = sim::start_replica(local, SIZE).await.unwrap();
    let target = sim::start_engine(local, "vol-clone", SIZE, vec![t1.url(), t2.url()])
        .await
        .unwrap();
    let t = target.served.addr;
    let clone = EngineSnapshotCloneRequest {
        proxy_engine_request: some_req(t),
        from_controller: source.to_string(),
        snapshot_name: "golden".into(),
        export_backing_image_if_exist: false,
    };
    s.client.snapshot_clone(clone.clone()).await.unwrap();
    for r in [&t1, &t2] {
        assert_eq!(r.replica.read(4096, data.len()), data);
        assert_eq!(
            r.replica.read(0, 4096),
            vec![0u8; 4096],
            "bytes written after the snapshot were cloned"
        );
    }
    assert!(s
        .client
        .snapshot_list(req(t))
        .await
        .unwrap()
        .into_inner()
        .disks
        .contains_key("golden"));
    let status = s
        .client
        .snapshot_clone_status(req(t))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status.len(), 2);
    for st in status.values() {
        assert_eq!(
            (st.state.as_str(), st.progress, st.snapshot_name.as_str()),
            ("complete", 100, "golden")
        );
        assert_eq!(st.from_replica_address, s.replicas[0].url());
    }

    // Every target replica must be RW.
    let t3 = sim::start_replica(local, SIZE).await.unwrap();
    let mut controller = ControllerServiceClient::connect(format!("http://{t}"))
        .await
        .unwrap();
    controller
        .controller_replica_create(ptypes::ControllerReplicaCreateRequest {
            address: t3.url(),
            snapshot_required: false,
            mode: ReplicaMode::Wo as i32,
        })
        .await
        .unwrap();
    let err = s.client.snapshot_clone(clone).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not RW"), "{err:?}");
}

async fn wait_for<F, Fut>(mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..250 {
        if done().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("condition not met within 5 s");
}

#[tokio::test]
async fn backup_to_a_vfs_target_and_restore_into_another_volume() {
    let mut s = setup().await;
    let e = s.engine.served.addr;
    let dir =
        std::env::temp_dir().join(format!("lhnet-backup-{}-{}", std::process::id(), e.port()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = format!("vfs://{}", dir.display());
    let data: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 97) as u8 + 1).collect();
    for r in &s.replicas {
        r.replica.write(0, &data).unwrap();
    }
    let snap = |name: &str| EngineVolumeSnapshotRequest {
        proxy_engine_request: some_req(e),
        snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
            name: name.into(),
            labels: Default::default(),
        }),
    };
    s.client.volume_snapshot(snap("bk1")).await.unwrap();
    let backup = |snapshot: &str, name: &str, envs: Vec<String>| EngineSnapshotBackupRequest {
        proxy_engine_request: some_req(e),
        envs,
        backup_name: name.into(),
        snapshot_name: snapshot.into(),
        backup_target: target.clone(),
        backing_image_name: String::new(),
        backing_image_checksum: String::new(),
        labels: [("app".to_string(), "db".to_string())].into(),
    };

    // Unknown env keys are refused before anything happens, and never reach the environment.
    let err = s
        .client
        .snapshot_backup(backup("bk1", "b0", vec!["LD_PRELOAD=/tmp/evil.so".into()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(std::env::var_os("LD_PRELOAD").is_none());
    assert_eq!(
        s.client
            .snapshot_backup(backup("volume-head", "b0", vec![]))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    let creds = vec![
        "AWS_ACCESS_KEY_ID=k".to_string(),
        "AWS_SECRET_ACCESS_KEY=s".into(),
    ];
    let reply = s
        .client
        .snapshot_backup(backup("bk1", "backup-one", creds))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            reply.backup_id.as_str(),
            reply.replica.as_str(),
            reply.is_incremental
        ),
        ("backup-one", s.replicas[0].url().as_str(), false)
    );

    let status_req = |name: &str, replica: &str| EngineSnapshotBackupStatusRequest {
        proxy_engine_request: some_req(e),
        backup_name: name.into(),
        replica_address: replica.into(),
    };
    let mut client = s.client.clone();
    wait_for(|| {
        let mut c = client.clone();
        let r = status_req("backup-one", "");
        async move {
            c.snapshot_backup_status(r)
                .await
                .map(|s| s.into_inner().state == "complete")
                .unwrap_or(false)
        }
    })
    .await;
    let status = client
        .snapshot_backup_status(status_req("backup-one", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.backup_url,
        format!("{target}?backup=backup-one&volume=vol-a")
    );
    assert_eq!(
        (status.progress, status.snapshot_name.as_str()),
        (100, "bk1")
    );
    assert_eq!(status.replica_address, s.replicas[0].url());
    let err = client
        .snapshot_backup_status(status_req("backup-one", "tcp://127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(err.message().contains("unknown replica"), "{err:?}");

    // Longhorn's layout and JSON, as the backupstore library reads them.
    let store = sim::backupstore::Target::parse(&target).unwrap();
    let vol = store.load_volume("vol-a").unwrap();
    assert_eq!(
        (
            vol.last_backup_name.as_str(),
            vol.block_count.as_str(),
            vol.backing_image_name.as_str()
        ),
        ("backup-one", "2", "\"\"")
    );
    let cfg_text = std::fs::read_to_string(store.volume_dir("vol-a").join("volume.cfg")).unwrap();
    assert!(
        cfg_text
            .starts_with("{\"Name\":\"vol-a\",\"Size\":\"67108864\",\"Labels\":{\"app\":\"db\"}"),
        "{cfg_text}"
    );

    // A second backup is incremental.
    s.client.volume_snapshot(snap("bk2")).await.unwrap();
    let reply = s
        .client
        .snapshot_backup(backup("bk2", "backup-two", vec![]))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.is_incremental);
    wait_for(|| {
        let mut c = client.clone();
        let r = status_req("backup-two", "");
        async move {
            c.snapshot_backup_status(r)
                .await
                .map(|s| s.into_inner().state == "complete")
                .unwrap_or(false)
        }
    })
    .await;

    // Restore into a fresh volume.
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let r1 = sim::start_replica(local, SIZE).await.unwrap();
    let r2 = sim::start_replica(local, SIZE).await.unwrap();
    let fresh = sim::start_engine(local, "vol-restored", SIZE, vec![r1.url(), r2.url()])
        .await
        .unwrap();
    let f = fresh.served.addr;
    let restore = |url: String| EngineBackupRestoreRequest {
        proxy_engine_request: some_req(f),
        envs: vec![],
        url,
        target: target.clone(),
        volume_name: "vol-a".into(),
    };
    let reply = client
        .backup_restore(restore(status.backup_url.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        reply.task_error.is_empty(),
        "{}",
        String::from_utf8_lossy(&reply.task_error)
    );
    wait_for(|| {
        let mut c = client.clone();
        async move {
            let st = c
                .backup_restore_status(req(f))
                .await
                .unwrap()
                .into_inner()
                .status;
            st.len() == 2 && st.values().all(|v| v.state == "complete")
        }
    })
    .await;
    let st = client
        .backup_restore_status(req(f))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert!(st
        .values()
        .all(|v| v.last_restored == "backup-one" && v.progress == 100 && !v.is_restoring));
    for r in [&r1, &r2] {
        assert_eq!(r.replica.read(0, data.len()), data);
    }

    // Errors come back in taskError with status OK: per replica as JSON ...
    let reply = client
        .backup_restore(restore(format!("{target}?volume=x")))
        .await
        .unwrap()
        .into_inner();
    let body: serde_json::Value = serde_json::from_slice(&reply.task_error).unwrap();
    assert_eq!(body["ReplicaErrors"].as_array().unwrap().len(), 2, "{body}");
    assert!(
        body["ReplicaErrors"][0]["Message"]
            .as_str()
            .unwrap()
            .contains("invalid volume name"),
        "{body}"
    );
    // ... or as text when the volume cannot be restored at all.
    let start = EngineVolumeFrontendStartRequest {
        proxy_engine_request: some_req(f),
        frontend_start: Some(ptypes::VolumeFrontendStartRequest {
            frontend: "tgt-blockdev".into(),
        }),
    };
    client.volume_frontend_start(start).await.unwrap();
    let reply = client
        .backup_restore(restore(status.backup_url.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(String::from_utf8_lossy(&reply.task_error).contains("frontend is up"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_to_s3_lists_through_the_backup_target_calls_and_restores() {
    let Some(moto) = common::start_moto("longhorn") else {
        return;
    };
    let mut s = setup().await;
    let e = s.engine.served.addr;
    let target = "s3://longhorn@us-east-1/cluster-a".to_string();
    let envs = common::s3_envs(&moto.endpoint);
    let data: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8 + 1).collect();
    for r in &s.replicas {
        r.replica.write(0, &data).unwrap();
    }
    s.client
        .volume_snapshot(EngineVolumeSnapshotRequest {
            proxy_engine_request: some_req(e),
            snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
                name: "s3snap".into(),
                labels: Default::default(),
            }),
        })
        .await
        .unwrap();
    s.client
        .snapshot_backup(EngineSnapshotBackupRequest {
            proxy_engine_request: some_req(e),
            envs: envs.clone(),
            backup_name: "backup-s3".into(),
            snapshot_name: "s3snap".into(),
            backup_target: target.clone(),
            backing_image_name: String::new(),
            backing_image_checksum: String::new(),
            labels: Default::default(),
        })
        .await
        .unwrap();
    let client = s.client.clone();
    let status = |c: ProxyEngineServiceClient<Channel>| async move {
        let mut c = c;
        c.snapshot_backup_status(EngineSnapshotBackupStatusRequest {
            proxy_engine_request: some_req(e),
            backup_name: "backup-s3".into(),
            replica_address: String::new(),
        })
        .await
        .map(|r| r.into_inner())
    };
    wait_for(|| {
        let c = client.clone();
        async move { status(c).await.is_ok_and(|s| s.state != "in_progress") }
    })
    .await;
    let done = status(client.clone()).await.unwrap();
    assert_eq!(done.state, "complete", "{done:?}");

    // The sidecar's backup-target calls see it, without an engine.
    let mut c = client.clone();
    let list = c
        .backup_volume_list(EngineBackupVolumeListRequest {
            envs: envs.clone(),
            dest_url: target.clone(),
            volume_name: String::new(),
            volume_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        list.volumes["vol-a"].backups.contains_key("backup-s3"),
        "{list:?}"
    );
    let got = c
        .backup_get(EngineBackupGetRequest {
            proxy_engine_request: None,
            envs: envs.clone(),
            dest_url: done.backup_url.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .backup
        .unwrap();
    assert_eq!(
        (got.snapshot_name.as_str(), got.size),
        ("s3snap", 3 * 2 * 1024 * 1024)
    );

    // Restored from S3 into a fresh volume, byte for byte.
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let r1 = sim::start_replica(local, SIZE).await.unwrap();
    let fresh = sim::start_engine(local, "vol-from-s3", SIZE, vec![r1.url()])
        .await
        .unwrap();
    let f = fresh.served.addr;
    let reply = c
        .backup_restore(EngineBackupRestoreRequest {
            proxy_engine_request: some_req(f),
            envs: envs.clone(),
            url: done.backup_url.clone(),
            target: target.clone(),
            volume_name: "vol-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.task_error.is_empty(), "{reply:?}");
    wait_for(|| {
        let mut c = client.clone();
        async move {
            let st = c.backup_restore_status(req(f)).await.unwrap().into_inner();
            st.status
                .values()
                .all(|v| !v.is_restoring && v.progress == 100)
        }
    })
    .await;
    assert_eq!(r1.replica.read(0, data.len()), data);

    // Removed through the sidecar: gone from the bucket as boto3 sees it.
    c.backup_remove(EngineBackupRemoveRequest {
        envs: envs.clone(),
        dest_url: target.clone(),
        volume_name: "vol-a".into(),
    })
    .await
    .unwrap();
    let (keys, _) = common::boto3_look(&moto.endpoint, "longhorn", "cluster-a/", "");
    assert!(keys.is_empty(), "left in the bucket: {keys:?}");
}

#[tokio::test]
async fn a_replica_in_err_is_left_out_of_reads_and_status_fan_outs() {
    let mut s = setup().await;
    let e = s.engine.served.addr;
    let snap = EngineVolumeSnapshotRequest {
        proxy_engine_request: some_req(e),
        snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
            name: "before-err".into(),
            labels: Default::default(),
        }),
    };
    s.client.volume_snapshot(snap).await.unwrap();
    // The engine marks a replica ERR (as after a failed I/O); its process is then gone.
    let mut controller = ControllerServiceClient::connect(format!("http://{e}"))
        .await
        .unwrap();
    let bad = s.replicas.remove(1);
    let bad_url = bad.url();
    controller
        .replica_update(ptypes::ControllerReplica {
            address: Some(ptypes::ReplicaAddress {
                address: bad_url.clone(),
            }),
            mode: ReplicaMode::Err as i32,
        })
        .await
        .unwrap();
    drop(bad);

    let list = s
        .client
        .replica_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .replica_list
        .unwrap()
        .replicas;
    let mode = list
        .iter()
        .find(|r| r.address.as_ref().unwrap().address == bad_url)
        .unwrap()
        .mode;
    assert_eq!(mode, ReplicaMode::Err as i32);
    // SnapshotList reads RW replicas only; purge and restore status skip ERR replicas.
    assert!(s
        .client
        .snapshot_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .disks
        .contains_key("before-err"));
    let purge = s
        .client
        .snapshot_purge_status(req(e))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(purge.keys().collect::<Vec<_>>(), vec![&s.replicas[0].url()]);
    let restore = s
        .client
        .backup_restore_status(req(e))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert!(!restore.contains_key(&bad_url));
    // Clone status asks every replica, so the dead one reports its error in its entry.
    let clone = s
        .client
        .snapshot_clone_status(req(e))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert!(!clone[&bad_url].error.is_empty());
    // A purge skips the ERR replica and starts on the others.
    s.client
        .snapshot_purge(EngineSnapshotPurgeRequest {
            proxy_engine_request: some_req(e),
            skip_if_in_progress: false,
        })
        .await
        .unwrap();
}

/// A replica on its own thread and runtime, so that it can die like a process: dropping the
/// runtime cancels every task it runs and closes every socket it holds, mid-call included.
struct ReplicaProcess {
    replica: sim::SimReplica,
    url: String,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReplicaProcess {
    fn start() -> ReplicaProcess {
        let (ready, started) = std::sync::mpsc::channel();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let r = sim::start_replica("127.0.0.1:0".parse().unwrap(), SIZE)
                    .await
                    .unwrap();
                ready.send((r.replica.clone(), r.url())).unwrap();
                let _ = killed.await;
                // Leak the handles: no graceful stop, the runtime's drop below is the death.
                std::mem::forget(r);
            });
        });
        let (replica, url) = started.recv().unwrap();
        ReplicaProcess {
            replica,
            url,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn mode_of(
    client: &mut ProxyEngineServiceClient<Channel>,
    e: SocketAddr,
    url: &str,
) -> Option<i32> {
    client
        .replica_list(req(e))
        .await
        .unwrap()
        .into_inner()
        .replica_list
        .unwrap()
        .replicas
        .iter()
        .find(|r| r.address.as_ref().unwrap().address == url)
        .map(|r| r.mode)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_whose_target_dies_mid_sync_fails_and_the_volume_keeps_serving() {
    let mut s = setup().await;
    let e = s.engine.served.addr;
    let block: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for r in &s.replicas {
        r.replica.write(0, &block).unwrap();
        // A disk-speed sender, so that the sync is long enough to be cut in the middle.
        r.replica.set_sync_rate(16 << 20);
    }
    let mut target = ReplicaProcess::start();
    let url = target.url.clone();
    let mut client = s.client.clone();
    let call = tokio::spawn({
        let url = url.clone();
        async move { client.replica_add(add(e, url, false)).await }
    });

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (got, total) = target.replica.rebuild_progress();
        if got > 0 && got < total {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rebuild never started moving bytes: {got}/{total}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    target.kill();

    let err = tokio::time::timeout(std::time::Duration::from_secs(15), call)
        .await
        .expect("ReplicaAdd returns once its target is gone")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("failed to sync files from") && err.message().contains(&url),
        "{err:?}"
    );
    // The engine's replica monitor notices the dead data connection and marks it ERR.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while mode_of(&mut s.client, e, &url).await != Some(ReplicaMode::Err as i32) {
        assert!(
            std::time::Instant::now() < deadline,
            "target still {:?}",
            mode_of(&mut s.client, e, &url).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The volume still serves from its RW replicas, with their bytes intact.
    for r in &s.replicas {
        assert_eq!(
            mode_of(&mut s.client, e, &r.url()).await,
            Some(ReplicaMode::Rw as i32)
        );
        assert_eq!(r.replica.read(0, block.len()), block);
    }
    assert_eq!(
        s.client
            .volume_get(req(e))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .name,
        "vol-a"
    );
}

#[tokio::test]
async fn frontend_writes_reach_every_replica_over_its_data_port() {
    let mut s = setup().await;
    let e = s.engine.served.addr;
    let frontend = sim::start_frontend("127.0.0.1:0".parse().unwrap(), &s.engine.engine)
        .await
        .unwrap();
    let mut io = sim::dataconn::DataClient::connect(&frontend.addr.to_string())
        .await
        .unwrap();
    let err = io.write_at(0, &[1; 4096]).await.unwrap_err();
    assert!(err.to_string().contains("frontend is not up"), "{err}");

    let start = EngineVolumeFrontendStartRequest {
        proxy_engine_request: some_req(e),
        frontend_start: Some(ptypes::VolumeFrontendStartRequest {
            frontend: "tgt-blockdev".into(),
        }),
    };
    s.client.volume_frontend_start(start).await.unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8 + 1).collect();
    for i in 0..4 {
        io.write_at(i << 20, &block).await.unwrap();
    }
    assert_eq!(io.read_at(3 << 20, 1 << 20).await.unwrap(), block);
    for r in &s.replicas {
        assert_eq!(r.replica.read(2 << 20, 1 << 20), block);
        assert!(r.data.accepted() >= 1, "the engine dialled {}", r.data.addr);
    }
    // A bad request is an error on that request; the connection goes on.
    let err = io.write_at(SIZE - 10, &[1; 4096]).await.unwrap_err();
    assert!(err.to_string().contains("outside the volume"), "{err}");
    io.ping().await.unwrap();

    // A replica whose data server dies is marked ERR; writes go on to the other one.
    let dead = s.replicas.pop().unwrap();
    let url = dead.url();
    drop(dead);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    io.write_at(0, &block[..4096]).await.unwrap();
    assert_eq!(
        mode_of(&mut s.client, e, &url).await,
        Some(ReplicaMode::Err as i32)
    );
    assert_eq!(s.replicas[0].replica.read(0, 4096), block[..4096]);
}
