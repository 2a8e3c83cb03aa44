#!/bin/bash
# Where lhnet-proxy's heap goes with STREAMS calls open (docs/benchmarks.md, issue 15):
#
#   loadtest/footprint-massif.sh [STREAMS] [SNAPSHOT_AFTER_SECONDS]     (root; valgrind, python3)
#
# Builds lhnet-proxy with the system allocator (massif sees only malloc; mimalloc maps its own
# pages) in target/system-alloc, runs `lhnet-loadtest bench-footprint --starts 1` on it under
# valgrind's massif, and, because bench-footprint ends lhnet with SIGKILL, takes a snapshot
# with vgdb while the calls are open: SNAPSHOT_AFTER_SECONDS (default 7.5) after valgrind
# starts, which is within bench-footprint's 8 s hold once lhnet is ready (about 2 s under
# valgrind). Prints bench-footprint's report, the heap at the snapshot and its sum by
# allocation site; the snapshot stays in target/system-alloc/massif.snapshot for ms_print.
set -euo pipefail
STREAMS=${1:-10000}
AFTER=${2:-7.5}
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build --release -p lhnet-proxy --features system-allocator --target-dir target/system-alloc
cargo build --release -p lhnet-loadtest
OUT=$PWD/target/system-alloc
rm -f "$OUT/massif.out" "$OUT/massif.snapshot"
cat > "$OUT/lhnet-proxy-massif" <<EOF
#!/bin/sh
exec valgrind --tool=massif --threshold=0.5 --vgdb=yes --massif-out-file=$OUT/massif.out \
  $OUT/release/lhnet-proxy "\$@"
EOF
chmod +x "$OUT/lhnet-proxy-massif"
target/release/lhnet-loadtest bench-footprint --starts 1 --streams "$STREAMS" \
  --proxy "$OUT/lhnet-proxy-massif" > "$OUT/footprint.txt" 2>&1 &
RUN=$!
PID=
for _ in $(seq 1 200); do
  for p in $(pgrep -f -- "--massif-out-file=$OUT/massif.out" || true); do
    case "$(cat /proc/"$p"/comm 2>/dev/null)" in massif*) PID=$p ;; esac
  done
  [ -n "$PID" ] && break
  sleep 0.1
done
[ -n "$PID" ] || { echo "valgrind did not start; bench-footprint said:" >&2; cat "$OUT/footprint.txt" >&2; exit 1; }
sleep "$AFTER"
vgdb --pid="$PID" detailed_snapshot "$OUT/massif.snapshot" >/dev/null 2>&1
wait "$RUN" || { echo "bench-footprint failed:" >&2; cat "$OUT/footprint.txt" >&2; exit 1; }
grep -E "ready|resident" "$OUT/footprint.txt"
python3 - "$OUT/massif.snapshot" <<'PY'
import re, sys
# A massif tree: each line "nK: BYTES ADDR: FUNCTION (FILE:LINE)", indented by depth; leaves
# (n0) are summed into the group of the first marker found on their path.
groups = [
    ("h2 send queue (Prioritize::queue_frame)", "queue_frame"),
    ("h2 stream state (both sides)", "insert<h2::proto::streams::stream::Stream>"),
    ("h2 received frames (server)", "Slot<h2::proto::streams::recv::Event>"),
    ("tokio tasks (hyper's per stream, ours)", "tokio::runtime::task::core::Cell"),
    ("boxed call futures (Box::pin)", "box_new_uninit"),
    ("h2 frame buffers (per connection)", "h2::codec::"),
]
line = re.compile(r"^( *)n(\d+): (\d+) (.*)$")
total, sums, path = 0, {}, []
for text in open(sys.argv[1]):
    if text.startswith("mem_heap_B="):
        total = int(text.split("=")[1])
    m = line.match(text)
    if not m:
        continue
    depth, children, size = len(m.group(1)), int(m.group(2)), int(m.group(3))
    path = path[:depth] + [m.group(4)]
    if children == 0 and depth > 0:
        joined = " ".join(path)
        name = next((g for g, marker in groups if marker in joined), "the rest")
        sums[name] = sums.get(name, 0) + size
print(f"heap at the snapshot: {total / 2**20:.1f} MiB")
for name, size in sorted(sums.items(), key=lambda kv: -kv[1]):
    print(f"  {size / 2**20:6.2f} MiB  {name}")
PY
