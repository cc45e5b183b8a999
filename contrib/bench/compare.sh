#!/usr/bin/env bash
# Side-by-side benchmark: vhost-device-blk against qemu-storage-daemon (QSD) on the same images,
# through the same client (vub-bench, libblkio), alternating rounds on fresh copies; plus two
# ceilings: QSD's null-co driver (the vhost-user transport, measured in the same rounds) and fio on
# the host file (the disk with O_DIRECT, the kernel's buffered read with the page cache).
# Prints a markdown table of medians and ratios; raw results go to $WORK/results.jsonl.
#
# Environment: RUNTIME (seconds per run, 5), ROUNDS (3), CACHES ("writeback none"),
# WORK (/var/tmp/vub-bench), ONLY (workload names to run alone, space-separated; the fio ceiling
# runs only with randread-4k-qd32), OURS_ARGS (more arguments for
# vhost-device-blk, e.g. "--mapped-reads off").
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-3}
CACHES=${CACHES:-"writeback none"}
WORK=${WORK:-/var/tmp/vub-bench}
ONLY=${ONLY:-}
OURS_ARGS=${OURS_ARGS:-}
command -v fio >/dev/null || { echo "installing fio"; apt-get install -y -qq fio >/dev/null; }

cargo build --release --quiet
(cd contrib/bench && cargo build --release --quiet)
DAEMON=$PWD/target/release/vhost-device-blk
BENCH=$PWD/contrib/bench/target/release/vub-bench
mkdir -p "$WORK"
cd "$WORK"
rm -f results.jsonl

# Images: a 2 GiB fully allocated qcow2 for reads and overwrites; empty 32 GiB ones for
# allocating writes (plain, extended L2, over a backing file, both).
if [ ! -e filled.qcow2 ]; then
    head -c 2G /dev/urandom > filled.raw
    qemu-img convert -O qcow2 filled.raw filled.qcow2
    rm filled.raw
fi
[ -e base.raw ] || truncate -s 32G base.raw
[ -e empty.qcow2 ] || qemu-img create -q -f qcow2 empty.qcow2 32G
[ -e empty-ext.qcow2 ] || qemu-img create -q -f qcow2 -o extended_l2=on empty-ext.qcow2 32G
[ -e over.qcow2 ] || qemu-img create -q -f qcow2 -b base.raw -F raw over.qcow2 32G
[ -e over-ext.qcow2 ] || qemu-img create -q -f qcow2 -b base.raw -F raw -o extended_l2=on over-ext.qcow2 32G

# name | image | queues | vub-bench arguments. A name ending in -cold runs with the image dropped
# from the page cache (page-cache mode only: with O_DIRECT every run is cold).
WORKLOADS="
randread-4k-qd1|filled|1|--rw randread --bs 4k --iodepth 1
randread-4k-qd32|filled|1|--rw randread --bs 4k --iodepth 32
overwrite-4k-qd32|filled|1|--rw randwrite --bs 4k --iodepth 32
seqread-1m|filled|1|--rw read --bs 1M --iodepth 4
seqwrite-1m|filled|1|--rw write --bs 1M --iodepth 4
alloc-4k-plain|empty|1|--rw randwrite --bs 4k --iodepth 32
alloc-4k-extl2|empty-ext|1|--rw randwrite --bs 4k --iodepth 32
alloc-4k-backing|over|1|--rw randwrite --bs 4k --iodepth 32
alloc-4k-extl2-backing|over-ext|1|--rw randwrite --bs 4k --iodepth 32
randread-4k-2q|filled|2|--rw randread --bs 4k --iodepth 16 --queues 2
randread-4k-qd32-cold|filled|1|--rw randread --bs 4k --iodepth 32
"

wait_socket() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }

start_backend() { # backend image cache queues
    local sock=$WORK/$1.sock
    rm -f "$sock"
    if [ "$1" = ours ]; then
        # shellcheck disable=SC2086
        "$DAEMON" --socket-path "$sock" --blk-file "$2" --format qcow2 --cache "$3" --num-queues "$4" $OURS_ARGS 2>/dev/null &
    elif [ "$1" = null-co ]; then
        # The transport ceiling: QSD's null driver completes every request at once.
        qemu-storage-daemon --blockdev driver=null-co,node-name=n,size=2147483648 \
            --export "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=$sock,writable=on,num-queues=$4" 2>/dev/null &
    else
        local direct=off aio=threads
        [ "$3" = none ] && direct=on aio=io_uring
        qemu-storage-daemon \
            --blockdev "driver=file,node-name=f,filename=$2,cache.direct=$direct,aio=$aio" \
            --blockdev driver=qcow2,node-name=q,file=f \
            --export "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path=$sock,writable=on,num-queues=$4" 2>/dev/null &
    fi
    PID=$!
    wait_socket "$sock"
    SOCK=$sock
}

stop_backend() { kill "$PID"; wait "$PID" 2>/dev/null || true; }

# Peak resident set size of the backend so far, in KiB.
peak_rss() { awk '/^VmHWM:/ {print $2}' "/proc/$PID/status"; }

# Samples a process's private memory (RssAnon) every 0.2 s while it lives; writes the peak (KiB).
# The total (VmHWM) also counts file pages the process maps: with mapped reads, the image's page
# cache.
anon_sampler() { # pid file
    local peak=0 a
    while kill -0 "$1" 2>/dev/null; do
        a=$(awk '/^RssAnon:/ {print $2}' "/proc/$1/status" 2>/dev/null || true)
        [ -n "$a" ] && [ "$a" -gt "$peak" ] && peak=$a && echo "$peak" > "$2"
        sleep 0.2
    done
}

# Writes a file's dirty pages and drops it from the page cache.
drop_cached() {
    python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$1"
}

record() { # cache workload backend json [peak RSS KiB] [peak RssAnon KiB]
    echo "{\"cache\": \"$1\", \"workload\": \"$2\", \"backend\": \"$3\", \"rss_kib\": ${5:-0}, \"anon_kib\": ${6:-0}, \"result\": $4}" >> results.jsonl
}

for cache in $CACHES; do
    echo "$WORKLOADS" | while IFS='|' read -r name image queues args; do
        [ -n "$name" ] || continue
        [ -z "$ONLY" ] || [[ " $ONLY " == *" $name "* ]] || continue
        cold=
        case $name in *-cold) cold=1 ;; esac
        [ -z "$cold" ] || [ "$cache" != none ] || continue
        # The 4 KiB random read workloads also measure the transport ceiling, in the same rounds.
        backends="ours qsd"
        case $name in randread-4k-qd1 | randread-4k-qd32) backends="ours qsd null-co" ;; esac
        for round in $(seq "$ROUNDS"); do
            for backend in $backends; do
                cp --sparse=always "$image.qcow2" run.qcow2
                [ -z "$cold" ] || drop_cached run.qcow2
                start_backend $backend "$WORK/run.qcow2" "$cache" "$queues"
                echo 0 > anon.txt
                anon_sampler "$PID" anon.txt &
                sampler=$!
                # shellcheck disable=SC2086
                out=$("$BENCH" --socket "$SOCK" --runtime "$RUNTIME" $args)
                rss=$(peak_rss)
                kill "$sampler"
                wait "$sampler" 2>/dev/null || true
                stop_backend
                record "$cache" "$name" $backend "$out" "$rss" "$(cat anon.txt)"
                echo "$cache $name round $round $backend: $out" >&2
            done
        done
    done
    # The host's ceiling: fio with io_uring on one thread on the raw file: the disk with O_DIRECT,
    # the kernel's buffered read with the page cache (kept: fio drops it by default).
    [ -z "$ONLY" ] || [[ " $ONLY " == *" randread-4k-qd32 "* ]] || continue
    direct=0
    [ "$cache" = none ] && direct=1
    qemu-img convert -O raw filled.qcow2 fio.raw
    [ "$cache" = none ] || cat fio.raw > /dev/null
    fio --name=ceiling --filename=fio.raw --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring \
        --direct=$direct --invalidate=0 --runtime="$RUNTIME" --time_based --output-format=json > fio.json 2>/dev/null
    iops=$(python3 -c "import json;print(round(json.load(open('fio.json'))['jobs'][0]['read']['iops']))")
    record "$cache" randread-4k-qd32 fio "{\"iops\": $iops}"
    rm -f fio.raw
done

python3 - <<'PY'
import json, statistics
rows = [json.loads(l) for l in open("results.jsonl")]
def med(cache, wl, be, key="iops", sub=None):
    v = [r["result"][key] if sub is None else r["result"][key][sub] for r in rows
         if r["cache"] == cache and r["workload"] == wl and r["backend"] == be]
    return statistics.median(v) if v else None
def peak(cache, wl, be, key="rss_kib"):
    return max(r.get(key, 0) for r in rows
               if r["cache"] == cache and r["workload"] == wl and r["backend"] == be) / 1024
for cache in sorted({r["cache"] for r in rows}):
    print(f"\n### cache={cache}\n")
    print("| workload | ours IOPS | QSD IOPS | ours/QSD | ours p50 µs | QSD p50 µs | ours p99 µs | QSD p99 µs "
          "| ours peak RSS MiB | QSD peak RSS MiB | ours RssAnon MiB | QSD RssAnon MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for wl in dict.fromkeys(r["workload"] for r in rows if r["cache"] == cache and r["backend"] == "ours"):
        o, q = med(cache, wl, "ours"), med(cache, wl, "qsd")
        print(f"| {wl} | {o:.0f} | {q:.0f} | {o/q:.2f} | {med(cache, wl, 'ours', 'lat_us', 'p50'):.1f} | "
              f"{med(cache, wl, 'qsd', 'lat_us', 'p50'):.1f} | {med(cache, wl, 'ours', 'lat_us', 'p99'):.1f} | "
              f"{med(cache, wl, 'qsd', 'lat_us', 'p99'):.1f} | {peak(cache, wl, 'ours'):.1f} | "
              f"{peak(cache, wl, 'qsd'):.1f} | {peak(cache, wl, 'ours', 'anon_kib'):.1f} | "
              f"{peak(cache, wl, 'qsd', 'anon_kib'):.1f} |")
    for qd in (1, 32):
        n = med(cache, f"randread-4k-qd{qd}", "null-co")
        o = med(cache, f"randread-4k-qd{qd}", "ours")
        if n and o:
            print(f"\nnull-co ceiling, 4k randread QD{qd}: {n:.0f} IOPS, p50 "
                  f"{med(cache, f'randread-4k-qd{qd}', 'null-co', 'lat_us', 'p50'):.1f} µs; ours = {o/n:.2f} of it")
    f = med(cache, "randread-4k-qd32", "fio")
    o = med(cache, "randread-4k-qd32", "ours")
    if f and o:
        print(f"\nfio on the host file (one thread, io_uring), 4k randread QD32: {f:.0f} IOPS; "
              f"ours = {o / f:.2f} of it")
PY
