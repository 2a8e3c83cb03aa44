"""Interop: Python's grpcio (an independent gRPC stack, like Longhorn's Go client) drives
imrpc.ProxyEngineService through the lhnet-proxy binary against the simulated engine.

Needs the binaries built (`cargo build --bins`); .ci/run does that and installs grpcio-tools.
"""

import os
import pathlib
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
             "ptypes/syncagent.proto", "imrpc/proxy.proto"]
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{wkt}", f"--python_out={out}",
                      f"--grpc_python_out={out}", *files])
    assert rc == 0, "grpc_tools.protoc failed on the project's protos"
    sys.path.insert(0, out)
    from imrpc import proxy_pb2, proxy_pb2_grpc  # noqa: E402
    from ptypes import controller_pb2  # noqa: E402
    return proxy_pb2, proxy_pb2_grpc, controller_pb2


def free_port_pair():
    """A port P with P+2 free too (replica layout)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port + 2 > 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 2))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="module")
def world(stubs):
    for binary in ("lhnet-proxy", "lhnet-loadtest"):
        if not (TARGET / binary).exists():
            pytest.fail(f"{TARGET / binary} is missing: run cargo build --bins first")
    engine, r1, r2, spare = free_port(), free_port_pair(), free_port_pair(), free_port_pair()
    sim = subprocess.Popen([str(TARGET / "lhnet-loadtest"), "sim", "--volume", "vol-py", "--size", "64Mi",
                            "--engine", f"127.0.0.1:{engine}", "--replica", f"127.0.0.1:{r1}",
                            "--replica", f"127.0.0.1:{r2}", "--spare", f"127.0.0.1:{spare}"],
                           stdout=subprocess.DEVNULL)
    listen, admin = free_port(), free_port()
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    config.write(f"""
admin: {{ address: 127.0.0.1:{admin} }}
storage_network: {{ interface: lo }}
listeners:
  - name: management
    address: 127.0.0.1:{listen}
    routes:
      - match: {{ prefix: /imrpc.ProxyEngineService/ }}
        local: longhorn_engine_proxy
clusters:
  - name: engines
    type: original_dst
    upstream_bind_config: {{ source_address: storage }}
    allowed_destinations: [127.0.0.1]
""")
    config.close()
    proxy = subprocess.Popen([str(TARGET / "lhnet-proxy"), "--config", config.name])
    try:
        wait_port(engine, sim, "lhnet-loadtest sim")
        wait_port(listen, proxy, "lhnet-proxy")
        channel = grpc.insecure_channel(f"127.0.0.1:{listen}")
        yield {"stub": stubs[1].ProxyEngineServiceStub(channel), "pb": stubs[0], "ptypes": stubs[2],
               "engine": f"127.0.0.1:{engine}", "spare": f"tcp://127.0.0.1:{spare}"}
        channel.close()
    finally:
        for p in (proxy, sim):
            p.terminate()
            p.wait(timeout=10)
        os.unlink(config.name)


def test_volume_and_version(world):
    pb, stub = world["pb"], world["stub"]
    req = pb.ProxyEngineRequest(address=world["engine"])
    volume = stub.VolumeGet(req, timeout=10).volume
    assert (volume.name, volume.size, volume.replicaCount) == ("vol-py", 64 << 20, 2)
    version = stub.ServerVersionGet(req, timeout=10).version
    assert version.cliAPIVersion == 5
    stub.Ping(empty_pb2.Empty(), timeout=10)


def test_snapshot_list_and_replica_add(world):
    pb, stub, ptypes = world["pb"], world["stub"], world["ptypes"]
    req = pb.ProxyEngineRequest(address=world["engine"])
    snap = pb.EngineVolumeSnapshotRequest(proxy_engine_request=req,
                                          snapshot_volume=ptypes.VolumeSnapshotRequest(name="py-snap"))
    assert stub.VolumeSnapshot(snap, timeout=10).snapshot.name == "py-snap"
    disks = stub.SnapshotList(req, timeout=10).disks
    assert "py-snap" in disks and disks["volume-head"].parent == "py-snap"

    stub.ReplicaAdd(pb.EngineReplicaAddRequest(proxy_engine_request=req, replica_address=world["spare"],
                                                size=64 << 20, currentSize=64 << 20), timeout=30)
    replicas = stub.ReplicaList(req, timeout=10).replica_list.replicas
    modes = {r.address.address: r.mode for r in replicas}
    assert modes[world["spare"]] == ptypes.RW
    status = stub.SnapshotPurgeStatus(req, timeout=10).status
    assert set(status) == set(modes)


def test_errors_keep_their_codes(world):
    pb, stub = world["pb"], world["stub"]
    with pytest.raises(grpc.RpcError) as denied:
        stub.VolumeGet(pb.ProxyEngineRequest(address="127.0.0.9:9501"), timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as bad:
        stub.VolumeGet(pb.ProxyEngineRequest(address="not an address"), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "address" in bad.value.details()
    revert = pb.EngineSnapshotRevertRequest(proxy_engine_request=pb.ProxyEngineRequest(address=world["engine"]),
                                            name="volume-head")
    with pytest.raises(grpc.RpcError) as head:
        stub.SnapshotRevert(revert, timeout=10)
    assert "volume head" in head.value.details()
