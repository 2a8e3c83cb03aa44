"""Interop: Python's grpcio (an independent gRPC stack, like Longhorn's Go client) drives
imrpc.ProxyEngineService through the lhnet-proxy binary against the simulated engine, with
requests shaped as a v1.12.1 manager shapes them (every ProxyEngineRequest field, the names the
engine checks) and, where noted, as a v1.3.3 manager does (the address only).

Needs the binaries built (`cargo build --bins`); .ci/run does that and installs grpcio-tools.
"""

import os
import pathlib
import select
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"


@pytest.fixture(scope="module")
def stubs():
    out = tempfile.mkdtemp(prefix="lhnet-py-")
    wkt = pathlib.Path(protoc.__file__).parent / "_proto"
    files = ["ptypes/common.proto", "ptypes/controller.proto", "ptypes/replica.proto",
             "ptypes/syncagent.proto", "imrpc/common.proto", "imrpc/proxy.proto"]
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{wkt}", f"--python_out={out}",
                      f"--grpc_python_out={out}", *files])
    assert rc == 0, "grpc_tools.protoc failed on the project's protos"
    sys.path.insert(0, out)
    from imrpc import proxy_pb2, proxy_pb2_grpc  # noqa: E402
    from ptypes import controller_pb2  # noqa: E402
    return proxy_pb2, proxy_pb2_grpc, controller_pb2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sim_addresses(sim):
    """What `lhnet-loadtest sim` bound, from its stdout: {"engine": "IP:PORT", "spare": "IP:PORT"}
    once the engine (started last) is up."""
    found, deadline = {}, time.time() + 15
    while time.time() < deadline:
        ready, _, _ = select.select([sim.stdout], [], [], 0.2)
        if not ready:
            if sim.poll() is not None:
                raise RuntimeError(f"lhnet-loadtest sim exited with {sim.returncode}")
            continue
        line = sim.stdout.readline()
        if not line:
            raise RuntimeError(f"lhnet-loadtest sim exited with {sim.wait(timeout=10)}")
        words = line.split()
        if words[0] == "replica" and line.rstrip().endswith(" spare"):
            found["spare"] = words[1].removeprefix("tcp://")
        elif words[0] == "engine":
            found["engine"] = words[1]
            return found
    raise RuntimeError("lhnet-loadtest sim did not report its engine within 15 s")


def wait_port(port, proc, what):
    deadline = time.time() + 15
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def start_proxy(routes, clusters):
    """lhnet-proxy with one listener, `management` on a free port, carrying `routes` (YAML list
    items) and `clusters`: (the process, the listener's port, the config file to remove)."""
    listen, admin = free_port(), free_port()
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    config.write(f"admin: {{ address: 127.0.0.1:{admin} }}\nstorage_network: {{ interface: lo }}\n"
                 f"listeners:\n  - name: management\n    address: 127.0.0.1:{listen}\n"
                 f"    routes:\n{routes}clusters:\n{clusters}")
    config.close()
    return subprocess.Popen([str(TARGET / "lhnet-proxy"), "--config", config.name]), listen, config.name


@pytest.fixture(scope="module")
def world(stubs):
    for binary in ("lhnet-proxy", "lhnet-loadtest"):
        if not (TARGET / binary).exists():
            pytest.fail(f"{TARGET / binary} is missing: run cargo build --bins first")
    # The simulator binds every port itself (port 0: a replica takes P with P+1 and P+2 free) and
    # prints what it bound, so no port it needs can be handed to anyone else meanwhile.
    sim = subprocess.Popen([str(TARGET / "lhnet-loadtest"), "sim", "--volume", "vol-py", "--size", "64Mi",
                            "--engine", "127.0.0.1:0", "--replica", "127.0.0.1:0",
                            "--replica", "127.0.0.1:0", "--spare", "127.0.0.1:0"],
                           stdout=subprocess.PIPE, text=True)
    try:
        bound = sim_addresses(sim)
    except BaseException:
        sim.kill()
        sim.wait(timeout=10)
        raise
    engine, spare = bound["engine"], bound["spare"]
    proxy, listen, config = start_proxy(
        "      - match: { prefix: /imrpc.ProxyEngineService/ }\n        local: longhorn_engine_proxy\n",
        "  - name: engines\n    type: original_dst\n    upstream_bind_config: { source_address: storage }\n"
        "    allowed_destinations: [127.0.0.1]\n")
    try:
        wait_port(listen, proxy, "lhnet-proxy")
        channel = grpc.insecure_channel(f"127.0.0.1:{listen}")
        yield {"stub": stubs[1].ProxyEngineServiceStub(channel), "pb": stubs[0], "ptypes": stubs[2],
               "engine": engine, "spare": f"tcp://{spare}",
               "spare_name": "vol-py-r-2"}
        channel.close()
    finally:
        for p in (proxy, sim):
            p.terminate()
            p.wait(timeout=10)
        os.unlink(config)


# imrpc/common.proto's enums (DataEngine, BackendStoreDriver).
DATA_ENGINE_V1, DATA_ENGINE_V2 = 0, 1


def v12(world, **overrides):
    """The ProxyEngineRequest a v1.12.1 manager sends for the simulated volume."""
    pb = world["pb"]
    fields = dict(address=world["engine"], backend_store_driver=0, engine_name="vol-py-e-0",
                  volume_name="vol-py", data_engine=DATA_ENGINE_V1, engine_frontend_name="")
    fields.update(overrides)
    return pb.ProxyEngineRequest(**fields)


def v13(world):
    """The ProxyEngineRequest a v1.3.3 manager sends: the address only."""
    return world["pb"].ProxyEngineRequest(address=world["engine"])


def test_volume_and_version(world):
    pb, stub = world["pb"], world["stub"]
    for req in (v12(world), v13(world)):
        volume = stub.VolumeGet(req, timeout=10).volume
        assert (volume.name, volume.size, volume.replicaCount) == ("vol-py", 64 << 20, 2)
        # The v1.12 reply fields a v1.12.1 manager's engine monitor compares.
        assert (volume.snapshot_max_count, volume.snapshot_max_size) == (250, 0)
    version = stub.ServerVersionGet(pb.ProxyEngineRequest(address=world["engine"]), timeout=10).version
    assert (version.cliAPIVersion, version.controllerAPIVersion) == (12, 6)
    stub.Ping(empty_pb2.Empty(), timeout=10)


def test_v1_12_calls_and_flags(world):
    pb, stub, ptypes = world["pb"], world["stub"], world["ptypes"]
    req = v12(world)
    stub.VolumeSnapshotMaxCountSet(pb.EngineVolumeSnapshotMaxCountSetRequest(
        proxy_engine_request=req, count=ptypes.VolumeSnapshotMaxCountSetRequest(count=100)), timeout=10)
    stub.ReplicaRebuildConcurrentSyncLimitSet(pb.EngineReplicaRebuildConcurrentSyncLimitSetRequest(
        proxy_engine_request=req, limit=2), timeout=10)
    assert stub.VolumeGet(req, timeout=10).volume.snapshot_max_count == 100
    assert stub.ReplicaRebuildConcurrentSyncLimitGet(req, timeout=10).limit == 2
    metrics = stub.MetricsGet(req, timeout=10).metrics
    assert metrics.readIOPS == 0 and metrics.writeIOPS == 0
    # v2 is the instance-manager's; this pod has no passthrough configured.
    with pytest.raises(grpc.RpcError) as v2:
        stub.VolumeGet(v12(world, data_engine=DATA_ENGINE_V2), timeout=10)
    assert v2.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "passthrough_cluster" in v2.value.details()
    with pytest.raises(grpc.RpcError) as qos:
        stub.ReplicaRebuildingQosSet(pb.EngineReplicaRebuildingQosSetRequest(
            proxy_engine_request=req, qos_limit_mbps=10), timeout=10)
    assert qos.value.details() == "unsupported data engine DATA_ENGINE_V1"


def test_a_call_for_another_volume_is_refused_by_the_engine(world):
    pb, stub, ptypes = world["pb"], world["stub"], world["ptypes"]
    wrong = v12(world, volume_name="vol-other", engine_name="vol-other-e-0")
    expand = pb.EngineVolumeExpandRequest(proxy_engine_request=wrong,
                                          expand=ptypes.VolumeExpandRequest(size=128 << 20))
    with pytest.raises(grpc.RpcError) as refused:
        stub.VolumeExpand(expand, timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "incorrect volume name vol-other; check controller address" in refused.value.details()
    assert stub.VolumeGet(v12(world), timeout=10).volume.size == 64 << 20


def test_snapshot_list_and_replica_add(world):
    pb, stub, ptypes = world["pb"], world["stub"], world["ptypes"]
    req = v12(world)
    snap = pb.EngineVolumeSnapshotRequest(proxy_engine_request=req,
                                          snapshot_volume=ptypes.VolumeSnapshotRequest(
                                              name="py-snap", labels={"k": ""}, freezeFilesystem=True))
    assert stub.VolumeSnapshot(snap, timeout=10).snapshot.name == "py-snap"
    disks = stub.SnapshotList(req, timeout=10).disks
    assert "py-snap" in disks and disks["volume-head"].parent == "py-snap"
    assert dict(disks["py-snap"].labels) == {"k": ""}

    add = pb.EngineReplicaAddRequest(proxy_engine_request=req, replica_address=world["spare"],
                                     size=64 << 20, current_size=64 << 20, fast_sync=True,
                                     file_sync_http_client_timeout=30, replica_name=world["spare_name"],
                                     grpc_timeout_seconds=600)
    stub.ReplicaAdd(add, timeout=30)
    replicas = stub.ReplicaList(req, timeout=10).replica_list.replicas
    modes = {r.address.address: r.mode for r in replicas}
    assert modes[world["spare"]] == ptypes.RW
    # A v1.3.3 manager's status call sees the same replicas, each with a value.
    status = stub.SnapshotPurgeStatus(v13(world), timeout=10).status
    assert set(status) == set(modes)
    assert all(s.error == "" for s in status.values())


def test_errors_keep_their_codes(world):
    pb, stub = world["pb"], world["stub"]
    with pytest.raises(grpc.RpcError) as denied:
        stub.VolumeGet(pb.ProxyEngineRequest(address="127.0.0.9:9501"), timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as bad:
        stub.VolumeGet(pb.ProxyEngineRequest(address="not an address"), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "address" in bad.value.details()
    revert = pb.EngineSnapshotRevertRequest(proxy_engine_request=v12(world), name="volume-head")
    with pytest.raises(grpc.RpcError) as head:
        stub.SnapshotRevert(revert, timeout=10)
    assert "volume head" in head.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        stub.VolumeGet(v12(world, data_engine=7), timeout=10)
    assert (unknown.value.code(), unknown.value.details()) == (grpc.StatusCode.UNIMPLEMENTED,
                                                                "unsupported data engine 7")
