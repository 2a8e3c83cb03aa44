#!/bin/bash
# Alternates lhnet-proxy builds on the engine proxy, in one session, against the standalone
# simulated engine (docs/benchmarks.md, "The engine proxy before and after"):
#
#   [STREAMS=64] [CALLS=200000] [TIMEOUT=10S] loadtest/engine-ab.sh RPC ROUNDS LHNET_PROXY_BINARY...
#   (RPC: VolumeGet or ReplicaList; STREAMS=1 measures one call at a time; TIMEOUT sends every
#   call with that grpc-timeout, as a Longhorn manager's calls are)
#
# Each round measures the engine directly, then each build: h2load -n CALLS -c 1 -m STREAMS -t 1
# (the simulator and h2load on CPU 1, the lhnet build alone on CPU 0, one thread) and prints
# calls/s, the ratio to direct and lhnet's CPU per call (utime + stime from /proc/PID/stat).
# Needs h2load, taskset, bc and a release build (cargo build --release). Uses loopback ports
# 19501 (engine), 19600-19612 (replica), 19800 (lhnet) and 19900 (lhnet's admin).
set -eu
RPC=$1; ROUNDS=$2; shift 2
DIR=$(mktemp -d)
LOADTEST=$(dirname "$0")/../target/release/lhnet-loadtest
cat > "$DIR/lhnet.yaml" <<'YAML'
admin: { address: 127.0.0.1:19900 }
storage_network: { interface: lo }
listeners:
  - name: m
    address: 127.0.0.1:19800
    routes:
      - match: { prefix: /imrpc.ProxyEngineService/ }
        local: longhorn_engine_proxy
clusters:
  - name: engines
    type: original_dst
    upstream_bind_config: { source_address: storage }
    allowed_destinations: [127.0.0.0/8]
YAML
# A v1.12.1 manager's ProxyEngineRequest (address, engine_name, volume_name), framed; and the
# engine's own request, an empty message.
printf '\x00\x00\x00\x00\x2b\x0a\x0f127.0.0.1:19501\x1a\x0dbench-vol-e-0\x22\x09bench-vol' > "$DIR/lhnet.bin"
printf '\x00\x00\x00\x00\x00' > "$DIR/direct.bin"
taskset -c 1 "$LOADTEST" sim --volume bench-vol --engine 127.0.0.1:19501 --replica 127.0.0.1:19600 \
    > "$DIR/sim.log" 2>&1 &
SIM=$!
trap 'kill $SIM 2>/dev/null; rm -rf "$DIR"' EXIT
sleep 1.5
REQ=${CALLS:-200000}
load() {
    taskset -c 1 h2load -n $REQ -c 1 -m "${STREAMS:-64}" -t 1 -d "$1" \
        -H 'content-type: application/grpc' -H 'te: trailers' ${TIMEOUT:+-H "grpc-timeout: $TIMEOUT"} \
        "$2" | awk '/finished/{print $4}'
}
for i in $(seq 1 "$ROUNDS"); do
    d=$(load "$DIR/direct.bin" "http://127.0.0.1:19501/ptypes.ControllerService/$RPC")
    line="round $i $RPC direct $d"
    for bin in "$@"; do
        taskset -c 0 "$bin" -c "$DIR/lhnet.yaml" --threads 1 --log-level warn > /dev/null 2>&1 &
        pid=$!
        sleep 0.5
        kill -0 $pid || { echo "$bin did not start (port 19800 in use?)"; exit 1; }
        load "$DIR/lhnet.bin" "http://127.0.0.1:19800/imrpc.ProxyEngineService/$RPC" > /dev/null
        t0=$(awk '{print $14+$15}' /proc/$pid/stat)
        r=$(load "$DIR/lhnet.bin" "http://127.0.0.1:19800/imrpc.ProxyEngineService/$RPC")
        t1=$(awk '{print $14+$15}' /proc/$pid/stat)
        kill $pid; wait $pid 2>/dev/null || true
        line="$line | $bin $r $(echo "$r/$d" | bc -l | cut -c1-5)x $(echo "($t1-$t0)*10000/$REQ" | bc -l | cut -c1-5)us"
    done
    echo "$line"
done
