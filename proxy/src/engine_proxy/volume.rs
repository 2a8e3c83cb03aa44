//! Volume calls: one `ControllerService` call each, the engine's reply kept whole.

use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes;
use tonic::Status;

use super::{call, logged, not_served, timed, Empty, EngineProxy};

/// Always the v1 path, whatever `data_engine` says (Longhorn's proxy does the same): the
/// engine binary's own version block.
pub(super) async fn server_version_get(
    p: &EngineProxy,
    r: ProxyEngineRequest,
) -> Result<EngineVersionProxyResponse, Status> {
    let engine = p.engine_at("address", &r.address, &r)?;
    logged("ServerVersionGet", &engine, false);
    let reply = call(
        &format!("get version detail of {}", engine.addr),
        p.controller(&engine).version_detail_get(timed(())),
    )
    .await?;
    Ok(EngineVersionProxyResponse {
        version: reply.version,
    })
}

pub(super) async fn get(
    p: &EngineProxy,
    r: ProxyEngineRequest,
) -> Result<EngineVolumeGetProxyResponse, Status> {
    let engine = p.engine(Some(&r))?;
    logged("VolumeGet", &engine, false);
    let volume = call(
        &format!("get volume {}", engine.addr),
        p.controller(&engine).volume_get(timed(())),
    )
    .await?;
    Ok(EngineVolumeGetProxyResponse {
        volume: Some(volume),
    })
}

pub(super) async fn expand(p: &EngineProxy, r: EngineVolumeExpandRequest) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("VolumeExpand", &engine, true);
    let size = r.expand.map(|e| e.size).unwrap_or_default();
    call(
        &format!("expand to size {size} for volume {}", engine.addr),
        p.controller(&engine)
            .volume_expand(timed(ptypes::VolumeExpandRequest { size })),
    )
    .await?;
    Ok(())
}

pub(super) async fn frontend_start(
    p: &EngineProxy,
    r: EngineVolumeFrontendStartRequest,
) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    let frontend = r.frontend_start.map(|f| f.frontend).unwrap_or_default();
    logged("VolumeFrontendStart", &engine, true);
    // An empty frontend goes on to the engine, which refuses it ("cannot start empty
    // frontend"), as through Longhorn's proxy.
    call(
        &format!("start frontend {frontend} for volume {}", engine.addr),
        p.controller(&engine)
            .volume_frontend_start(timed(ptypes::VolumeFrontendStartRequest { frontend })),
    )
    .await?;
    Ok(())
}

pub(super) async fn frontend_shutdown(
    p: &EngineProxy,
    r: ProxyEngineRequest,
) -> Result<Empty, Status> {
    let engine = p.engine(Some(&r))?;
    logged("VolumeFrontendShutdown", &engine, true);
    call(
        &format!("shutdown frontend for volume {}", engine.addr),
        p.controller(&engine).volume_frontend_shutdown(timed(())),
    )
    .await?;
    Ok(())
}

pub(super) async fn unmap_mark_set(
    p: &EngineProxy,
    r: EngineVolumeUnmapMarkSnapChainRemovedSetRequest,
) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("VolumeUnmapMarkSnapChainRemovedSet", &engine, true);
    let enabled = r.unmap_mark_snap.map(|u| u.enabled).unwrap_or_default();
    call(
        &format!(
            "set UnmapMarkSnapChainRemoved to {enabled} for volume {}",
            engine.addr
        ),
        p.controller(&engine)
            .volume_unmap_mark_snap_chain_removed_set(timed(
                ptypes::VolumeUnmapMarkSnapChainRemovedSetRequest { enabled },
            )),
    )
    .await?;
    Ok(())
}

pub(super) async fn snapshot_max_count_set(
    p: &EngineProxy,
    r: EngineVolumeSnapshotMaxCountSetRequest,
) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("VolumeSnapshotMaxCountSet", &engine, true);
    let count = r.count.map(|c| c.count).unwrap_or_default();
    call(
        &format!("set SnapshotMaxCount to {count} for volume {}", engine.addr),
        p.controller(&engine).volume_snapshot_max_count_set(timed(
            ptypes::VolumeSnapshotMaxCountSetRequest { count },
        )),
    )
    .await?;
    Ok(())
}

pub(super) async fn snapshot_max_size_set(
    p: &EngineProxy,
    r: EngineVolumeSnapshotMaxSizeSetRequest,
) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("VolumeSnapshotMaxSizeSet", &engine, true);
    let size = r.size.map(|s| s.size).unwrap_or_default();
    call(
        &format!("set SnapshotMaxSize to {size} for volume {}", engine.addr),
        p.controller(&engine)
            .volume_snapshot_max_size_set(timed(ptypes::VolumeSnapshotMaxSizeSetRequest { size })),
    )
    .await?;
    Ok(())
}

pub(super) async fn metrics_get(
    p: &EngineProxy,
    r: ProxyEngineRequest,
) -> Result<EngineMetricsGetProxyResponse, Status> {
    let engine = p.engine(Some(&r))?;
    logged("MetricsGet", &engine, false);
    let reply = call(
        &format!("get metrics for volume {}", engine.addr),
        p.controller(&engine).metrics_get(timed(())),
    )
    .await?;
    Ok(EngineMetricsGetProxyResponse {
        metrics: reply.metrics,
    })
}

/// Remounts a volume of the host: the instance-manager does it in the host's mount namespace.
pub(super) async fn remount_read_only(
    _p: &EngineProxy,
    _r: RemountVolumeRequest,
) -> Result<Empty, Status> {
    Err(not_served("RemountReadOnlyVolume"))
}
