//! What reached the simulated engine and replicas, read from their record, for the calls the
//! area tests (engine_volume, engine_snapshot, engine_backup, engine_replica) drive for their
//! answers: purge, the status maps, hashing, the replica list, the concurrent sync limit, mode
//! update and a named ReplicaRemove. As a v1.12.1 manager sends them, every engine call carries
//! `volume-name` and `instance-name` (the engine's) and every replica and sync-agent call
//! `volume-name`; as a v1.3.3 manager sends them, none does. The fields each request set are
//! the ones the engine or replica got.

use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes::{self, ReplicaMode};

mod common;
use common::longhorn::{self, identity, replica_name, wait_for, Manager, Volume};

/// The identity every engine call and every replica call must carry for manager `m`.
fn check_identity(v: &Volume, m: Manager, what: &str) {
    let named = m == Manager::V1_12_1;
    v.assert_engine_calls_named(m, what);
    for (i, r) in v.replicas.iter().enumerate() {
        // Sync-agent calls are lhnet's (the engine's own ReplicaService calls, such as the
        // ReplicaClose of a ReplicaDelete, carry the engine's identity, not the manager's).
        let calls = r.record().calls();
        for call in calls
            .iter()
            .filter(|c| c.path.starts_with("/ptypes.SyncAgentService/"))
        {
            let (volume, instance) = identity(call);
            assert_eq!(
                volume,
                named.then_some(v.name.as_str()),
                "{what}: replica {i} call {}",
                call.path
            );
            // A replica call names no instance, or this replica (never the engine).
            let own = replica_name(&v.name, i);
            assert!(
                instance.is_none() || instance == Some(own.as_str()),
                "{what}: replica {i} call {} named instance {instance:?}",
                call.path
            );
        }
    }
}

/// Every replica of `v` was asked `method` once while recording.
fn asked_each(v: &Volume, method: &str) {
    for (i, r) in v.replicas.iter().enumerate() {
        assert_eq!(
            r.record().of::<()>(method).len(),
            1,
            "replica {i}: {method}"
        );
    }
}

/// Starts recording on the engine and the replicas, runs `f`, and checks what they got.
macro_rules! recorded {
    ($v:expr, $m:expr, $what:expr, $call:expr) => {{
        $v.record();
        let out = $call;
        let calls = $v.engine.record().calls();
        check_identity(&$v, $m, $what);
        (out, calls)
    }};
}

async fn identities(m: Manager) {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-id", 2).await;
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 239) as u8 + 1).collect();
    v.write(0, &data);
    for name in ["i1", "i2"] {
        p.client
            .volume_snapshot(EngineVolumeSnapshotRequest {
                proxy_engine_request: v.per(m),
                snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
                    name: name.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }

    // ReplicaList: the engine's list, every replica, by address.
    let (listed, calls) = recorded!(v, m, "ReplicaList", {
        p.client.replica_list(v.req(m)).await.unwrap().into_inner()
    });
    let listed: Vec<String> = listed
        .replica_list
        .unwrap()
        .replicas
        .into_iter()
        .map(|r| r.address.unwrap().address)
        .collect();
    assert_eq!(
        listed,
        v.replicas.iter().map(|r| r.url()).collect::<Vec<_>>()
    );
    assert!(calls.iter().any(|c| c.path.ends_with("/ReplicaList")));

    // The four status maps: one entry per replica, asked of each replica's sync agent.
    let (status, _) = recorded!(v, m, "SnapshotPurgeStatus", {
        p.client
            .snapshot_purge_status(v.req(m))
            .await
            .unwrap()
            .into_inner()
            .status
    });
    assert_eq!(status.len(), 2);
    asked_each(&v, "SnapshotPurgeStatus");
    let (status, _) = recorded!(v, m, "SnapshotCloneStatus", {
        p.client
            .snapshot_clone_status(v.req(m))
            .await
            .unwrap()
            .into_inner()
            .status
    });
    assert_eq!(status.len(), 2);
    asked_each(&v, "SnapshotCloneStatus");
    let (status, _) = recorded!(v, m, "BackupRestoreStatus", {
        p.client
            .backup_restore_status(v.req(m))
            .await
            .unwrap()
            .into_inner()
            .status
    });
    assert_eq!(status.len(), 2);
    asked_each(&v, "RestoreStatus");
    let (status, _) = recorded!(v, m, "ReplicaRebuildingStatus", {
        p.client
            .replica_rebuilding_status(v.req(m))
            .await
            .unwrap()
            .into_inner()
            .status
    });
    assert!(status.is_empty(), "no replica is rebuilding: {status:?}");
    // SnapshotPurge after removing i1: every replica's sync agent is asked to purge, and i1's
    // file goes.
    p.client
        .snapshot_remove(EngineSnapshotRemoveRequest {
            proxy_engine_request: v.per(m),
            names: vec!["i1".into()],
        })
        .await
        .unwrap();
    recorded!(v, m, "SnapshotPurge", {
        p.client
            .snapshot_purge(EngineSnapshotPurgeRequest {
                proxy_engine_request: v.per(m),
                skip_if_in_progress: m == Manager::V1_12_1,
            })
            .await
            .unwrap();
        let mut c = p.client.clone();
        let r = v.req(m);
        wait_for(10, "the purge completes on both replicas", || {
            let (mut c, r) = (c.clone(), r.clone());
            async move {
                let st = c
                    .snapshot_purge_status(r)
                    .await
                    .unwrap()
                    .into_inner()
                    .status;
                st.len() == 2 && st.values().all(|s| !s.is_purging)
            }
        })
        .await;
        c.snapshot_purge_status(v.req(m)).await.unwrap()
    });
    for r in &v.replicas {
        assert_eq!(r.record().of::<()>("SnapshotPurge").len(), 1);
        assert!(!r
            .replica
            .snapshots()
            .contains(&"volume-snap-i1.img".to_string()));
    }

    // SnapshotHash with rehash, and its status, from the replicas.
    recorded!(v, m, "SnapshotHash", {
        p.client
            .snapshot_hash(EngineSnapshotHashRequest {
                proxy_engine_request: v.per(m),
                snapshot_name: "i2".into(),
                rehash: true,
            })
            .await
            .unwrap();
        let c = p.client.clone();
        let r = EngineSnapshotHashStatusRequest {
            proxy_engine_request: v.per(m),
            snapshot_name: "i2".into(),
        };
        wait_for(10, "hashing completes on both replicas", || {
            let (mut c, r) = (c.clone(), r.clone());
            async move {
                let st = c.snapshot_hash_status(r).await.unwrap().into_inner().status;
                st.len() == 2 && st.values().all(|s| s.state == "complete")
            }
        })
        .await;
    });
    for r in &v.replicas {
        let asked = r.record().of::<ptypes::SnapshotHashRequest>("SnapshotHash");
        assert_eq!(
            asked
                .iter()
                .map(|(_, h)| (h.snapshot_name.as_str(), h.rehash))
                .collect::<Vec<_>>(),
            vec![("i2", true)]
        );
        let statuses = r
            .record()
            .of::<ptypes::SnapshotHashStatusRequest>("SnapshotHashStatus");
        assert!(!statuses.is_empty());
        assert!(statuses.iter().all(|(_, s)| s.snapshot_name == "i2"));
    }

    // The concurrent sync limit: set reaches the engine with its value, get reads it back.
    let (_, calls) = recorded!(v, m, "ReplicaRebuildConcurrentSyncLimitSet", {
        p.client
            .replica_rebuild_concurrent_sync_limit_set(
                EngineReplicaRebuildConcurrentSyncLimitSetRequest {
                    proxy_engine_request: v.per(m),
                    limit: 3,
                },
            )
            .await
            .unwrap()
    });
    let set: Vec<i32> = calls
        .iter()
        .filter(|c| c.path.ends_with("/ReplicaRebuildConcurrentSyncLimitSet"))
        .map(|c| {
            <ptypes::ReplicaRebuildConcurrentSyncLimitSetRequest as prost::Message>::decode(
                c.message.clone(),
            )
            .unwrap()
            .limit
        })
        .collect();
    assert_eq!(set, vec![3]);
    let (limit, calls) = recorded!(v, m, "ReplicaRebuildConcurrentSyncLimitGet", {
        p.client
            .replica_rebuild_concurrent_sync_limit_get(v.req(m))
            .await
            .unwrap()
            .into_inner()
            .limit
    });
    assert_eq!(limit, 3);
    assert!(calls
        .iter()
        .any(|c| c.path.ends_with("/ReplicaRebuildConcurrentSyncLimitGet")));

    // ReplicaModeUpdate to ERR: the engine's ReplicaUpdate names the replica and the mode.
    let second = v.replicas[1].url();
    let (_, calls) = recorded!(v, m, "ReplicaModeUpdate", {
        p.client
            .replica_mode_update(EngineReplicaModeUpdateRequest {
                proxy_engine_request: v.per(m),
                replica_address: second.clone(),
                mode: ReplicaMode::Err as i32,
            })
            .await
            .unwrap()
    });
    let updated: Vec<(String, i32)> = calls
        .iter()
        .filter(|c| c.path.ends_with("/ReplicaUpdate"))
        .map(|c| {
            let r =
                <ptypes::ControllerReplica as prost::Message>::decode(c.message.clone()).unwrap();
            (r.address.unwrap().address, r.mode)
        })
        .collect();
    assert_eq!(updated, vec![(second.clone(), ReplicaMode::Err as i32)]);

    // ReplicaRemove of that replica, named as a v1.12.1 manager names it: the engine deletes
    // that address. Longhorn's proxy sends v1 engines the address only (`ReplicaDelete(address)`,
    // the name is for v2), and so does lhnet.
    let name = match m {
        Manager::V1_12_1 => replica_name(&v.name, 1),
        Manager::V1_3_3 => String::new(),
    };
    let (_, calls) = recorded!(v, m, "ReplicaRemove", {
        p.client
            .replica_remove(EngineReplicaRemoveRequest {
                proxy_engine_request: v.per(m),
                replica_address: second.clone(),
                replica_name: name.clone(),
            })
            .await
            .unwrap()
    });
    let deleted: Vec<(String, String)> = calls
        .iter()
        .filter(|c| c.path.ends_with("/ReplicaDelete"))
        .map(|c| {
            let r = <ptypes::ReplicaAddress as prost::Message>::decode(c.message.clone()).unwrap();
            (r.address, r.instance_name)
        })
        .collect();
    assert_eq!(deleted, vec![(second.clone(), String::new())]);
    let left: Vec<String> = p
        .client
        .replica_list(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .replica_list
        .unwrap()
        .replicas
        .into_iter()
        .map(|r| r.address.unwrap().address)
        .collect();
    assert_eq!(left, vec![v.replicas[0].url()]);
}

#[tokio::test]
async fn every_call_carries_a_v1_12_1_managers_identity_to_the_engine_and_replicas() {
    identities(Manager::V1_12_1).await;
}

#[tokio::test]
async fn a_v1_3_3_managers_calls_carry_no_identity() {
    identities(Manager::V1_3_3).await;
}
