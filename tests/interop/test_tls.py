"""Longhorn's mTLS through grpcio (the C-core TLS stack, like Go's in what it offers: TLS 1.3,
ALPN h2): a client with the longhorn-grpc-tls certificate is served by a `tls: required`
listener; one without a certificate, with another CA's, or in plaintext is refused; and the
manager's sequence (mTLS + health Check, on failure plaintext + health Check) meets each mode.

The certificates are made by `lhnet-proxy webhook-cert --service longhorn-backend --namespace
longhorn-system`: its leaf carries the DNS SAN longhorn-backend.longhorn-system that Longhorn's
instance-manager checks.
"""

import os
import subprocess
import tempfile

import grpc
import pytest

from test_engine_proxy import TARGET, free_port, wait_port

NAME = "longhorn-backend.longhorn-system"


@pytest.fixture(scope="module")
def health_stubs():
    """grpc.health.v1.Health/Check by hand: the request names a service (field 1), the answer
    SERVING is field 1 = 1. (grpcio's own `grpc` package shadows generated grpc.health stubs.)"""
    service = b"imrpc.ProxyEngineService"
    request = b"\x0a" + bytes([len(service)]) + service

    def call(channel):
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        return check(request, timeout=5) == b"\x08\x01"
    return call


def certs(service):
    out = tempfile.mkdtemp(prefix=f"lhnet-tls-{service}-")
    subprocess.run([str(TARGET / "lhnet-proxy"), "webhook-cert", "--service", service,
                    "--namespace", "longhorn-system", "--out", out], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def read(folder, name):
    with open(os.path.join(folder, name), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def pki():
    if not (TARGET / "lhnet-proxy").exists():
        pytest.fail(f"{TARGET / 'lhnet-proxy'} is missing: run cargo build --bins first")
    return {"longhorn": certs("longhorn-backend"), "stranger": certs("someone-else")}


def start(tls):
    listen, admin = free_port(), free_port()
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    config.write(f"admin: {{ address: 127.0.0.1:{admin} }}\nstorage_network: {{ interface: lo }}\n"
                 f"listeners:\n  - name: management\n    address: 127.0.0.1:{listen}\n{tls}"
                 "    routes:\n      - { match: { prefix: /grpc.health.v1.Health/ }, local: health }\n")
    config.close()
    proc = subprocess.Popen([str(TARGET / "lhnet-proxy"), "--config", config.name],
                            stderr=subprocess.PIPE, text=True)
    wait_port(listen, proc, "lhnet-proxy")
    return proc, listen, config.name


def tls_yaml(folder, mode):
    return (f"    tls: {{ mode: {mode}, ca: {folder}/ca.crt, cert: {folder}/tls.crt, "
            f"key: {folder}/tls.key }}\n")


def check(call, channel):
    """The manager's first call on a client: Health/Check, any service name."""
    try:
        return call(channel)
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def tls_channel(port, folder, identity=True):
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(folder, "ca.crt"),
        private_key=read(folder, "tls.key") if identity else None,
        certificate_chain=read(folder, "tls.crt") if identity else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds,
                               options=[("grpc.ssl_target_name_override", NAME)])


def manager_connect(stubs, port, folder):
    if check(stubs, tls_channel(port, folder)):
        return "tls"
    if check(stubs, grpc.insecure_channel(f"127.0.0.1:{port}")):
        return "plaintext"
    return None


def stop(proc, config):
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    os.unlink(config)
    return err


def test_required_serves_longhorns_certificate_and_refuses_the_rest(health_stubs, pki):
    proc, port, config = start(tls_yaml(pki["longhorn"], "required"))
    try:
        assert check(health_stubs, tls_channel(port, pki["longhorn"]))
        assert not check(health_stubs, tls_channel(port, pki["longhorn"], identity=False))
        # Another CA's certificate (it names someone-else.longhorn-system, and trusts its own CA).
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(pki["longhorn"], "ca.crt"),
            private_key=read(pki["stranger"], "tls.key"),
            certificate_chain=read(pki["stranger"], "tls.crt"))
        stranger = grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                       options=[("grpc.ssl_target_name_override", NAME)])
        assert not check(health_stubs, stranger)
        assert not check(health_stubs, grpc.insecure_channel(f"127.0.0.1:{port}"))
    finally:
        err = stop(proc, config)
    # The refusals are logged, saying why.
    assert "TLS handshake with" in err and "did not start TLS" in err, err


@pytest.mark.parametrize("mode,expected", [("required", "tls"), ("optional", "tls"),
                                           ("off", "plaintext"), (None, "plaintext"),
                                           ("optional-without-files", "plaintext")])
def test_the_managers_sequence_meets_every_mode(health_stubs, pki, mode, expected):
    if mode is None:
        tls = ""
    elif mode == "optional-without-files":
        tls = tls_yaml("/nonexistent", "optional")
    else:
        tls = tls_yaml(pki["longhorn"], mode)
    proc, port, config = start(tls)
    try:
        assert manager_connect(health_stubs, port, pki["longhorn"]) == expected
    finally:
        stop(proc, config)
