"""A malformed grpc-timeout from one client must change nothing for the others: lhnet refuses
it (INVALID_ARGUMENT naming the header) and never forwards a client's grpc-timeout as sent, so
a grpcio upstream behind a pooled connection keeps answering everyone.

The upstream is Python's grpcio server (a stack other than lhnet's own); the hostile client
speaks HTTP/2 through the `h2` library so it can send what grpcio's client would refuse to.
"""

import os
import socket
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from test_engine_proxy import TARGET, start_proxy, wait_port


def echo_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture(scope="module")
def proxy():
    if not (TARGET / "lhnet-proxy").exists():
        pytest.fail(f"{TARGET / 'lhnet-proxy'} is missing: run cargo build --bins first")
    server, upstream = echo_server()
    proc, listen, config = start_proxy(
        "      - match: { prefix: /echo.Echo/ }\n        cluster: echo\n",
        f"  - name: echo\n    endpoints: [127.0.0.1:{upstream}]\n")
    try:
        wait_port(listen, proc, "lhnet-proxy")
        yield listen
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        server.stop(None)
        os.unlink(config)


def raw_call(port, timeout_header):
    """One unary call sent by hand; returns the response's headers and trailers as a dict."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "lhnet"),
                               (":path", "/echo.Echo/Say"), ("content-type", "application/grpc"),
                               ("te", "trailers"), ("grpc-timeout", timeout_header)])
    conn.send_data(stream, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    sock.sendall(conn.data_to_send())
    seen = {}
    try:
        while True:
            data = sock.recv(65535)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    seen.update(dict(event.headers))
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return seen
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return seen


def test_malformed_grpc_timeout_is_refused_and_harms_no_one(proxy):
    channel = grpc.insecure_channel(f"127.0.0.1:{proxy}")
    say = channel.unary_unary("/echo.Echo/Say")
    assert say(b"before", timeout=5) == b"before"
    for bad in ["-5S", "+5S", "5", "123456789S", "1.5S"]:
        reply = raw_call(proxy, bad)
        assert reply.get("grpc-status") == "3", (bad, reply)
        assert "grpc-timeout" in reply.get("grpc-message", ""), (bad, reply)
        # The others' calls, on lhnet's pooled connection to the same upstream, are unharmed.
        assert say(b"after " + bad.encode(), timeout=5) == b"after " + bad.encode()
    # A well-formed one travels (re-encoded by lhnet) and the call succeeds.
    assert raw_call(proxy, "5S").get("grpc-status") == "0"
    channel.close()
