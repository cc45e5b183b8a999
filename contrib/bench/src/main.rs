//! vub-bench: drives a vhost-user-blk socket through libblkio and reports IOPS, throughput and
//! latency percentiles as JSON.
//!
//! `vub-bench --socket PATH [--rw randread|randwrite|read|write] [--bs BYTES] [--iodepth N]
//!  [--queues N] [--runtime SECONDS] [--region BYTES] [--offset BYTES] [--seed N]`

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

#[derive(Clone)]
struct Opts {
    socket: String,
    rw: String,
    bs: u64,
    iodepth: usize,
    queues: usize,
    runtime: f64,
    region: Option<u64>,
    offset: u64,
    seed: u64,
}

fn parse() -> Opts {
    let mut o = Opts {
        socket: String::new(),
        rw: "randread".into(),
        bs: 4096,
        iodepth: 1,
        queues: 1,
        runtime: 10.0,
        region: None,
        offset: 0,
        seed: 1,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = |s: &str| -> u64 {
        let (n, m) = match s.chars().last() {
            Some('k' | 'K') => (&s[..s.len() - 1], 1 << 10),
            Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
            Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
            _ => (s, 1),
        };
        n.parse::<u64>().expect("a size") * m
    };
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--socket" => o.socket = v,
            "--rw" => o.rw = v,
            "--bs" => o.bs = size(&v),
            "--iodepth" => o.iodepth = v.parse().expect("iodepth"),
            "--queues" => o.queues = v.parse().expect("queues"),
            "--runtime" => o.runtime = v.parse().expect("runtime"),
            "--region" => o.region = Some(size(&v)),
            "--offset" => o.offset = size(&v),
            "--seed" => o.seed = v.parse().expect("seed"),
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    assert!(!o.socket.is_empty(), "--socket is required");
    o
}

struct QueueResult {
    ops: u64,
    lat_ns: Vec<u32>,
}

fn main() {
    let o = parse();
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", &o.socket).unwrap();
    b.connect().expect("connect");
    b.set_i32("num-queues", o.queues as i32).unwrap();
    b.set_i32("queue-size", (o.iodepth * 2).next_power_of_two().max(64) as i32).unwrap();
    let mut queues = b.start().expect("start").queues;
    let capacity = b.get_u64("capacity").unwrap();
    let region = o.region.unwrap_or(capacity - o.offset).min(capacity - o.offset);
    let align = b.get_u64("mem-region-alignment").unwrap() as usize;
    let per_queue = o.iodepth * o.bs as usize;
    let mem = b
        .alloc_mem_region((per_queue * o.queues).next_multiple_of(align))
        .expect("memory");
    b.map_mem_region(&mem).expect("map");
    // Writes carry non-zero data.
    // SAFETY: the region was just allocated for us and is this long.
    unsafe { std::ptr::write_bytes(mem.addr as *mut u8, 0x5a, per_queue * o.queues) };

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(o.runtime);
    let results: Vec<QueueResult> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .enumerate()
            .map(|(qi, q)| {
                let o = o.clone();
                let base = mem.addr + qi * per_queue;
                s.spawn(move || {
                    let mut rng = o.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (qi as u64 + 1);
                    let blocks = region / o.bs;
                    let mut seq = (qi as u64 * blocks / o.queues as u64) % blocks.max(1);
                    let mut next = |rng: &mut u64| -> u64 {
                        let blk = if o.rw.starts_with("rand") {
                            *rng ^= *rng << 13;
                            *rng ^= *rng >> 7;
                            *rng ^= *rng << 17;
                            *rng % blocks
                        } else {
                            seq = (seq + 1) % blocks;
                            seq
                        };
                        o.offset + blk * o.bs
                    };
                    let write = o.rw.ends_with("write");
                    let mut issued = vec![Instant::now(); o.iodepth];
                    let mut lat = Vec::with_capacity(1 << 20);
                    let mut ops = 0u64;
                    let mut submit = |slot: usize, q: &mut blkio::Blkioq, rng: &mut u64, issued: &mut Vec<Instant>| {
                        let off = next(rng);
                        let buf = (base + slot * o.bs as usize) as *mut u8;
                        issued[slot] = Instant::now();
                        if write {
                            q.write(off, buf, o.bs as usize, slot, ReqFlags::empty());
                        } else {
                            q.read(off, buf, o.bs as usize, slot, ReqFlags::empty());
                        }
                    };
                    for slot in 0..o.iodepth {
                        submit(slot, q, &mut rng, &mut issued);
                    }
                    let mut done: Vec<MaybeUninit<Completion>> =
                        (0..o.iodepth).map(|_| MaybeUninit::uninit()).collect();
                    let mut in_flight = o.iodepth;
                    while in_flight > 0 {
                        let n = q.do_io(&mut done, 1, None, None).expect("do_io");
                        let now = Instant::now();
                        for c in &done[..n] {
                            // SAFETY: do_io initialised the first n completions.
                            let c = unsafe { c.assume_init_read() };
                            assert_eq!(c.ret, 0, "I/O error {}", c.ret);
                            lat.push((now - issued[c.user_data]).as_nanos().min(u32::MAX as u128) as u32);
                            ops += 1;
                            if now < deadline {
                                submit(c.user_data, q, &mut rng, &mut issued);
                            } else {
                                in_flight -= 1;
                            }
                        }
                    }
                    QueueResult { ops, lat_ns: lat }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let ops: u64 = results.iter().map(|r| r.ops).sum();
    let mut lat: Vec<u32> = results.into_iter().flat_map(|r| r.lat_ns).collect();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            0.0
        } else {
            f64::from(lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)]) / 1000.0
        }
    };
    println!(
        "{{\"rw\": \"{}\", \"bs\": {}, \"iodepth\": {}, \"queues\": {}, \"seconds\": {:.3}, \"ops\": {}, \"iops\": {:.0}, \"mbps\": {:.1}, \"lat_us\": {{\"p50\": {:.1}, \"p99\": {:.1}, \"p999\": {:.1}}}}}",
        o.rw,
        o.bs,
        o.iodepth,
        o.queues,
        secs,
        ops,
        ops as f64 / secs,
        ops as f64 * o.bs as f64 / secs / 1e6,
        pct(0.5),
        pct(0.99),
        pct(0.999)
    );
}
