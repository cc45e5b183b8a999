#!/usr/bin/env python3
"""Writes the seed corpus in contrib/fuzz/corpus/ (committed; rerun only to change it).

Input formats are documented in src/fuzzing/*.rs. qcow2 seeds need the daemon binary
(target/debug/vhost-device-blk, for `create`) and, for the QEMU-made ones, qemu-img/qemu-io.
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CORPUS = os.path.join(HERE, "corpus")

NEXT, WRITE, INDIRECT = 1, 2, 4


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def hdr(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


# --- request_parse: 16 descriptors, head byte, memory from 0x1000 -------------------------
def chain(descs, head, mem):
    table = b"".join(descs).ljust(256, b"\0")
    return table + bytes([head]) + mem


def mem_with(parts):
    """parts: {address: bytes}, addresses from 0x1000."""
    end = max(a + len(b) for a, b in parts.items())
    buf = bytearray(end - 0x1000)
    for a, b in parts.items():
        buf[a - 0x1000 : a - 0x1000 + len(b)] = b
    return bytes(buf)


def request_seeds():
    rw = [desc(0x1000, 16, NEXT, 1), desc(0x2000, 512, NEXT | WRITE, 2), desc(0x3000, 1, WRITE)]
    put("request_parse", "read", chain(rw, 0, mem_with({0x1000: hdr(0, 1)})))
    wr = [desc(0x1000, 16, NEXT, 1), desc(0x2000, 512, NEXT, 2), desc(0x3000, 1, WRITE)]
    put("request_parse", "write", chain(wr, 0, mem_with({0x1000: hdr(1, 7)})))
    gid = [desc(0x1000, 16, NEXT, 1), desc(0x2000, 20, NEXT | WRITE, 2), desc(0x3000, 1, WRITE)]
    put("request_parse", "get_id", chain(gid, 0, mem_with({0x1000: hdr(8, 0)})))
    fl = [desc(0x1000, 16, NEXT, 1), desc(0x3000, 1, WRITE)]
    put("request_parse", "flush", chain(fl, 0, mem_with({0x1000: hdr(4, 0)})))
    segs = struct.pack("<QII", 0, 8, 0) + struct.pack("<QII", 64, 16, 1)
    dz = [desc(0x1000, 16, NEXT, 1), desc(0x1100, 32, NEXT, 2), desc(0x3000, 1, WRITE)]
    put("request_parse", "discard", chain(dz, 0, mem_with({0x1000: hdr(11, 0), 0x1100: segs})))
    put("request_parse", "write_zeroes", chain(dz, 0, mem_with({0x1000: hdr(13, 0), 0x1100: segs})))
    # Header split in two, data across the boundary of two regions, status after a hole.
    split = [
        desc(0x1000, 5, NEXT, 1),
        desc(0x1005, 11, NEXT, 2),
        desc(0x7F00, 0x200, NEXT | WRITE, 3),
        desc(0x20010, 1, WRITE),
    ]
    put("request_parse", "split", chain(split, 0, mem_with({0x1000: hdr(0, 3)})))
    table = desc(0x1000, 16, NEXT, 1) + desc(0x2000, 512, NEXT | WRITE, 2) + desc(0x3000, 1, WRITE)
    ind = [desc(0x1800, 48, INDIRECT)]
    put("request_parse", "indirect", chain(ind, 0, mem_with({0x1000: hdr(0, 2), 0x1800: table})))
    loop = [desc(0x1000, 16, NEXT, 1), desc(0x3000, 1, NEXT | WRITE, 0)]
    put("request_parse", "loop", chain(loop, 0, mem_with({0x1000: hdr(0, 0)})))


# --- qcow2_ops: u16 image length, image, 4-byte operations --------------------------------
def ops_bytes(ops):
    return b"".join(struct.pack("<BHB", k, sector, count) for k, sector, count in ops)


OPS = [
    (0, 0, 15),  # read 8 KiB at 0
    (1, 3, 2),  # write 3 sectors at sector 3
    (0, 0, 15),
    (2 | 0x80, 4, 0),  # write-zeroes with UNMAP, sector 4
    (1, 40, 15),
    (3, 41, 1),  # discard
    (4, 0, 0),  # flush
    (2, 60, 7),  # write-zeroes without UNMAP
    (0, 40, 15),
    (1, 127, 0),
    (0, 120, 15),
]


def qcow2_seeds():
    binary = os.path.join(ROOT, "target", "debug", "vhost-device-blk")
    with tempfile.TemporaryDirectory() as d:
        made = []
        for name, args in [
            ("ours_512", ["--cluster-size", "512"]),
            ("ours_4k_lazy", ["--cluster-size", "4K", "--lazy-refcounts"]),
        ]:
            p = os.path.join(d, name)
            subprocess.run([binary, "create", *args, p, "64K"], check=True)
            made.append((name, p))
        if shutil.which("qemu-img") and shutil.which("qemu-io"):
            for name, opts in [
                ("qemu_v3_512", "cluster_size=512"),
                ("qemu_v2_512", "compat=0.10,cluster_size=512"),
            ]:
                p = os.path.join(d, name)
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, "64K"], check=True)
                subprocess.run(
                    ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4k", "-c", "write -z 8k 1k",
                     "-c", "write -c -P 0x33 16k 512", p],
                    check=True, stdout=subprocess.DEVNULL,
                )
                made.append((name, p))
        for name, p in made:
            img = open(p, "rb").read()
            assert len(img) < 65536, name
            put("qcow2_ops", name, struct.pack("<H", len(img)) + img + ops_bytes(OPS))


# --- vhost_user_stream: chunks [len u16][flags u8][bytes] ---------------------------------
def chunk(data, flags=0):
    return struct.pack("<HB", len(data), flags) + data


def msg(code, body=b"", flags=0x1):
    return struct.pack("<III", code, flags, len(body)) + body


UVA = 0x7F00_0000_0000
FEATURES = 1 << 32 | 1 << 30 | 1 << 29 | 1 << 28
PROTOCOL = 1 | 8 | 0x200 | 1 << 15
NEED_REPLY = 0x1 | 0x8


def guest_memory():
    """Rings of queue 0 (desc 0, avail 0x100, used 0x200) with one read request offered."""
    mem = bytearray(0x3001)
    mem[0:48] = desc(0x1000, 16, NEXT, 1) + desc(0x2000, 512, NEXT | WRITE, 2) + desc(0x3000, 1, WRITE)
    mem[0x100:0x106] = struct.pack("<HHH", 0, 1, 0)
    mem[0x1000:0x1010] = hdr(0, 4)
    return bytes(mem)


def setup(event_idx_features=FEATURES):
    region = struct.pack("<QQQQ", 0, 0x10000, UVA, 0)
    return [
        chunk(guest_memory(), 0x40),
        chunk(msg(3)),  # SET_OWNER
        chunk(msg(1)),  # GET_FEATURES
        chunk(msg(2, struct.pack("<Q", event_idx_features))),
        chunk(msg(15)),  # GET_PROTOCOL_FEATURES
        chunk(msg(16, struct.pack("<Q", PROTOCOL))),
        chunk(msg(17)),  # GET_QUEUE_NUM
        chunk(msg(5, struct.pack("<II", 1, 0) + region, NEED_REPLY), 1),  # SET_MEM_TABLE + memfd
        chunk(msg(8, struct.pack("<II", 0, 16), NEED_REPLY)),  # SET_VRING_NUM
        chunk(msg(9, struct.pack("<IIQQQQ", 0, 0, UVA, UVA + 0x200, UVA + 0x100, 0), NEED_REPLY)),
        chunk(msg(10, struct.pack("<II", 0, 0), NEED_REPLY)),  # SET_VRING_BASE
        chunk(msg(13, struct.pack("<Q", 0), NEED_REPLY), 1 | 4),  # SET_VRING_CALL + eventfd
        chunk(msg(12, struct.pack("<Q", 0), NEED_REPLY), 1 | 4),  # SET_VRING_KICK + eventfd
        chunk(msg(18, struct.pack("<II", 0, 1), NEED_REPLY), 0x80),  # SET_VRING_ENABLE, kick
    ]


def vhost_user_seeds():
    put("vhost_user_stream", "read_request", b"".join(setup() + [chunk(msg(11, struct.pack("<II", 0, 0)))]))
    put("vhost_user_stream", "no_event_idx", b"".join(setup(FEATURES & ~(1 << 29))))
    put(
        "vhost_user_stream",
        "config_and_slots",
        b"".join(
            setup()[:7]
            + [
                chunk(msg(24, struct.pack("<III", 0, 60, 0) + bytes(60))),  # GET_CONFIG
                chunk(msg(36)),  # GET_MAX_MEM_SLOTS
                chunk(msg(37, struct.pack("<QQQQQ", 0, 0x20000, 0x10000, UVA + 0x20000, 0), NEED_REPLY), 1),
                chunk(msg(38, struct.pack("<QQQQQ", 0, 0x20000, 0x10000, UVA + 0x20000, 0), NEED_REPLY)),
            ]
        ),
    )


def inflight_seeds():
    """In-flight regions (src/fuzzing/inflight.rs): fresh, and as a killed daemon leaves one."""
    stride = (16 * 32 + 2 + 63) // 64 * 64
    put("inflight_region", "fresh", bytes([4]) + struct.pack("<H", 7))
    region = bytearray(stride)
    struct.pack_into("<HHHH", region, 8, 1, 16, 3, 5)
    for head, counter, marked in [(2, 9, 1), (3, 10, 0), (7, 11, 1), (11, 12, 1)]:
        struct.pack_into("<B5xHQ", region, 16 + 16 * head, marked, 0, counter)
    # used_idx 5, ring used 6: head 3 (last_batch_head) published, not cleared.
    put("inflight_region", "killed", bytes([4]) + struct.pack("<H", 6) + bytes(region))
    struct.pack_into("<H", region, 14, 0xFFF0)
    put("inflight_region", "far_off", bytes([4]) + struct.pack("<H", 6) + bytes(region))


if __name__ == "__main__":
    inflight_seeds()
    request_seeds()
    vhost_user_seeds()
    if len(sys.argv) < 2 or sys.argv[1] != "--no-qcow2":
        qcow2_seeds()
