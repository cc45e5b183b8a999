//! Crash-safe restart under a running Linux guest. QEMU (TCG, two vCPUs) has a
//! vhost-user-blk-pci device with two queues on the daemon and reconnects when it goes away.
//! Inside, four writers put numbered, self-describing 4 KiB records on their own blocks with
//! O_DIRECT and read their blocks back, two bulk writers copy 4 MiB at a time (the host's page
//! cache fills with dirty data), and two flushers keep FLUSH requests in flight on both queues,
//! so completions are out of order. The test SIGKILLs the daemon at random moments, each
//! when the daemon has had a request (a FLUSH, mostly) blocked in the kernel for a few
//! milliseconds, and starts it again on the same socket; once it SIGTERMs it instead. Each
//! time it waits for QEMU to reconnect and every process in the guest to move again. Then the
//! guest stops (a process stuck for more than a minute has lost a request: HANG), reads the
//! region back, compares each block with its last completed write (flushed or not), and prints
//! its verdict. The host stops the daemon cleanly, runs `qemu-img check` on a qcow2 image and
//! compares the region in the image file with what the guest read.
//!
//! Without in-flight tracking (`--inflight off`) the same scenario must fail: QEMU restarts
//! each ring at its used index, so requests taken but not completed are lost and completed ones
//! are executed and completed again ("is not a head!"). The control: the same restarts without
//! in-flight tracking, each with QEMU paused and the daemon idle, must pass.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::guest::{tail, GuestKit, Qemu, QemuConfig};
use common::{Daemon, Rng};

/// Writers in the guest; writer `w` owns the runs of 8 blocks `j * WRITERS + w` of the region.
const WRITERS: u32 = 4;
/// Blocks (4 KiB) each writer owns.
const BLOCKS_PER_WRITER: u32 = 256;
/// First block of the region (1 MiB into the disk).
const BASE_BLOCK: u32 = 256;
/// A guest process that has not moved for longer than this has lost a request.
const HANG_SECS: u32 = 60;
/// How long the host waits for every writer and flusher to move again after a restart.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(HANG_SECS as u64);

/// The guest's /init. `@W@`, `@K@`, `@BASE@` and `@HANG@` are replaced by the constants above.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
W=@W@
K=@K@
RUN=8
BASE=@BASE@
HANG=@HANG@
NB=$((W * K))
NAMES="w0 w1 w2 w3 f0 f1 b0 b1"
# The bulk writers' scratch areas start at the first 4 MiB boundary after the region.
SCRATCH4=$(((BASE + NB) / 1024 + 1))
fail() { echo "GUEST-RESULT: FAIL $*"; poweroff -f; }
for m in $(cat /modules/order); do insmod /modules/$m || echo "insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || fail "no /dev/vda"
echo "GUEST-QUEUES $(ls /sys/block/vda/mq | wc -l)"
mkdir -p /tmp/st /tmp/run

# R = the record for region block $1 holding its writer's sequence number $2: one 63-byte line
# (block, writer, sequence, a checksum of them) and a newline, 64 times. Builtins only.
PAD="................................................................"
rec() {
    l="vub b=$1 w=$((($1 / RUN) % W)) n=$2 c=$((($1 * 2654435761 + $2 * 40503 + 977) % 1000000007)) $PAD"
    R="${l:0:63}
"
    R="$R$R"; R="$R$R"; R="$R$R"; R="$R$R"; R="$R$R"; R="$R$R"
}

# RR = the records run $1 (RUN blocks from block $1) should hold, with zeroes left out as the
# shell leaves NUL bytes out of a command's output.
run_want() {
    RR=""
    i=0
    while [ $i -lt $RUN ]; do
        if [ -e /tmp/st/$(($1 + i)) ]; then read m < /tmp/st/$(($1 + i)); rec $(($1 + i)) $m; RR="$RR$R"; fi
        i=$((i + 1))
    done
}

# Writer $1 owns the runs of RUN blocks j * W + $1 (so all writers share every qcow2 cluster).
# It writes a random run of its own with O_DIRECT (one 4 KiB request a block), remembers each
# completed write in /tmp/st/BLOCK, and reads a random run of its own back.
writer() {
    w=$1
    n=0
    while [ ! -e /tmp/run/stop ]; do
        n=$((n + 1))
        b=$((((RANDOM % (K / RUN)) * W + w) * RUN))
        RR=""
        i=0
        while [ $i -lt $RUN ]; do rec $((b + i)) $n; RR="$RR$R"; i=$((i + 1)); done
        if ! printf '%s' "$RR" | dd of=/dev/vda bs=4096 seek=$((BASE + b)) count=$RUN \
            oflag=direct conv=notrunc iflag=fullblock 2>/tmp/run/dd.w$w; then
            echo "GUEST-ERROR writer $w: writing blocks $b+$RUN failed: $(cat /tmp/run/dd.w$w)"
            : > /tmp/run/failed
            break
        fi
        i=0
        while [ $i -lt $RUN ]; do echo $n > /tmp/st/$((b + i)); i=$((i + 1)); done
        b=$((((RANDOM % (K / RUN)) * W + w) * RUN))
        if ! got=$(dd if=/dev/vda bs=4096 skip=$((BASE + b)) count=$RUN iflag=direct 2>/tmp/run/dd.w$w); then
            echo "GUEST-ERROR writer $w: reading blocks $b+$RUN failed: $(cat /tmp/run/dd.w$w)"
            : > /tmp/run/failed
            break
        fi
        run_want $b
        if [ "$got" != "${RR%?}" ]; then
            i=0
            while [ $i -lt $RUN ]; do
                want=""
                if [ -e /tmp/st/$((b + i)) ]; then read m < /tmp/st/$((b + i)); rec $((b + i)) $m; want="${R:0:63}"; fi
                have=$(dd if=/dev/vda bs=4096 skip=$((BASE + b + i)) count=1 iflag=direct 2>/dev/null | tr '\0' '0' | head -c 63)
                echo "GUEST-ERROR writer $w: block $((b + i)) holds [$have], last written [$want]"
                i=$((i + 1))
            done
            : > /tmp/run/failed
            break
        fi
        echo $n > /tmp/run/cnt.w$w
    done
    : > /tmp/run/done.w$w
}

# fdatasync on the disk: a FLUSH request, all the time.
flusher() {
    n=0
    while [ ! -e /tmp/run/stop ]; do
        if ! sync -d /dev/vda 2>/tmp/run/sync.f$1; then
            echo "GUEST-ERROR flusher $1: flush failed: $(cat /tmp/run/sync.f$1)"
            : > /tmp/run/failed
            break
        fi
        n=$((n + 1))
        echo $n > /tmp/run/cnt.f$1
    done
    : > /tmp/run/done.f$1
}

# Copies 16 MiB within its scratch area (32 MiB each, after the region) in 4 MiB O_DIRECT
# reads and writes (the guest splits them into several requests in flight together): no
# copying in the guest, and the host's page cache fills with dirty data fast, so each FLUSH
# takes a while and the requests behind it complete first.
bulk() {
    n=0
    while [ ! -e /tmp/run/stop ]; do
        if ! dd if=/dev/vda of=/dev/vda bs=4M skip=$((SCRATCH4 + 8 * $1 + 4 * (n % 2))) \
            seek=$((SCRATCH4 + 8 * $1 + 4 * ((n + 1) % 2))) count=4 iflag=direct oflag=direct \
            conv=notrunc 2>/tmp/run/dd.b$1; then
            echo "GUEST-ERROR bulk writer $1: copying failed: $(cat /tmp/run/dd.b$1)"
            : > /tmp/run/failed
            break
        fi
        n=$((n + 1))
        echo $n > /tmp/run/cnt.b$1
    done
    : > /tmp/run/done.b$1
}

# Every second: each process's count, and for how long (s) it has not moved (/tmp/run/age.*).
monitor() {
    read up rest < /proc/uptime
    for x in $NAMES; do eval "prev_$x=0; last_$x=${up%.*}"; done
    while [ ! -e /tmp/run/halt ]; do
        read up rest < /proc/uptime
        now=${up%.*}
        line="GUEST-PROGRESS t=$now"
        stall=0
        for x in $NAMES; do
            eval "p=\$prev_$x; l=\$last_$x"
            c=""
            [ -e /tmp/run/cnt.$x ] && read c < /tmp/run/cnt.$x
            [ -n "$c" ] || c=$p
            if [ "$c" != "$p" ] || [ -e /tmp/run/done.$x ]; then
                l=$now
                eval "prev_$x=$c; last_$x=$now"
            fi
            age=$((now - l))
            echo $age > /tmp/run/age.$x
            [ $age -gt $stall ] && stall=$age
            line="$line $x=$c"
        done
        echo "$line stall=$stall"
        sleep 1
    done
}

# Writers 0 and 2 and flusher 0 on CPU 0 (queue 0), the others on CPU 1 (queue 1).
for w in $(seq 0 $((W - 1))); do
    writer $w &
    taskset -p -c $((w % 2)) $! > /dev/null
done
for f in 0 1; do
    flusher $f &
    taskset -p -c $f $! > /dev/null
    bulk $f &
    taskset -p -c $f $! > /dev/null
done
monitor &
echo "GUEST-RUNNING"

# Until the host says stop on ttyS1.
cmd=""
while [ "$cmd" != "stop" ]; do
    read -t 900 cmd < /dev/ttyS1 || { echo "GUEST-NOTE no stop from the host"; break; }
done
: > /tmp/run/stop
echo "GUEST-STOPPING"
waited=0
while :; do
    pending=""
    hung=""
    for x in $NAMES; do
        [ -e /tmp/run/done.$x ] && continue
        pending="$pending $x"
        age=0
        [ -e /tmp/run/age.$x ] && read age < /tmp/run/age.$x
        [ "${age:-0}" -gt $HANG ] && hung="$hung $x:${age}s"
    done
    [ -z "$pending" ] && break
    dmesg | grep -q "is not a head" && [ $waited -ge 2 ] && fail "the driver got a request back twice (is not a head!); still running after ${waited}s:$pending"
    [ -e /tmp/run/failed ] && [ $waited -ge 5 ] && fail "I/O error or wrong data during the run (GUEST-ERROR above); still running after ${waited}s:$pending"
    [ -n "$hung" ] && fail "HANG: no progress for more than ${HANG}s:$hung"
    sleep 1
    waited=$((waited + 1))
done
: > /tmp/run/halt
[ -e /tmp/run/failed ] && fail "I/O error or wrong data during the run (GUEST-ERROR above)"
writes=0
for w in $(seq 0 $((W - 1))); do [ -e /tmp/run/cnt.w$w ] && read c < /tmp/run/cnt.w$w && writes=$((writes + c)); done
flushes=0
for f in 0 1; do [ -e /tmp/run/cnt.f$f ] && read c < /tmp/run/cnt.f$f && flushes=$((flushes + c)); done
echo "GUEST-VERIFY $((writes * RUN)) writes, $flushes flushes"

# What the region should hold: each block's last completed record, zeroes where none.
Z='\0'
for i in 1 2 3 4 5 6 7 8 9 10 11 12; do Z="$Z$Z"; done
b=0
while [ $b -lt $NB ]; do
    if [ -e /tmp/st/$b ]; then read n < /tmp/st/$b; rec $b $n; printf '%s' "$R"; else printf "$Z"; fi
    b=$((b + 1))
done > /tmp/expect.img
dd if=/dev/vda of=/tmp/got.img bs=65536 skip=$((BASE / 16)) count=$((NB / 16)) iflag=direct \
    2>/tmp/run/dd.verify || fail "reading the region back: $(cat /tmp/run/dd.verify)"
set -- $(sha256sum /tmp/got.img)
echo "GUEST-REGION-SHA256 $1"
if ! cmp -s /tmp/expect.img /tmp/got.img; then
    cmp -l /tmp/expect.img /tmp/got.img | head -n 100000 \
        | awk '{ b = int(($1 - 1) / 4096); if (!(b in s)) { s[b] = 1; print b } }' > /tmp/bad
    for b in $(head -n 8 /tmp/bad); do
        e=$(dd if=/tmp/expect.img bs=4096 skip=$b count=1 2>/dev/null | tr '\0' '0' | head -c 63)
        g=$(dd if=/tmp/got.img bs=4096 skip=$b count=1 2>/dev/null | tr '\0' '0' | head -c 63)
        echo "GUEST-MISMATCH block $b: expected [$e] read [$g]"
    done
    fail "MISMATCH: $(wc -l < /tmp/bad) or more of $NB blocks differ from their last write"
fi
echo "GUEST-RESULT: PASS"
poweroff -f
"#;

/// How the daemon is stopped before each restart.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    Kill,
    Term,
}

/// What the guest must conclude.
#[derive(PartialEq)]
enum Expect {
    /// No error, no hang, every block holds its last write.
    Pass,
    /// The scenario catches the missing in-flight tracking: the test restarts the daemon (the
    /// whole plan at most) until the guest shows an I/O error, wrong data, a hang, or the
    /// driver's "is not a head!".
    Fail,
}

struct Case {
    qcow2: bool,
    /// Extra daemon arguments (every incarnation).
    daemon_args: &'static [&'static str],
    /// The daemon's stops, in order, each followed by a restart.
    plan: Vec<Stop>,
    /// Pause QEMU and let the daemon finish everything before each stop (a control: then no
    /// request is in flight, and a restart needs no in-flight tracking).
    paused: bool,
    expect: Expect,
}

#[test]
fn daemon_killed_and_restarted_under_guest_load_raw() {
    run(Case {
        qcow2: false,
        daemon_args: &[],
        plan: positive_plan(),
        paused: false,
        expect: Expect::Pass,
    });
}

#[test]
fn daemon_killed_and_restarted_under_guest_load_qcow2_subclusters() {
    run(Case {
        qcow2: true,
        daemon_args: &[],
        plan: positive_plan(),
        paused: false,
        expect: Expect::Pass,
    });
}

#[test]
fn without_inflight_tracking_a_restart_under_load_breaks_the_guest() {
    run(Case {
        qcow2: false,
        daemon_args: &["--inflight", "off"],
        plan: vec![Stop::Kill; 30],
        paused: false,
        expect: Expect::Fail,
    });
}

/// The control for the case above: the same restarts without in-flight tracking, each while
/// QEMU is paused (SIGSTOP) and the daemon idle, lose nothing. So what fails above is the
/// requests in flight, not the restarts themselves or this test.
#[test]
fn without_inflight_tracking_restarts_with_nothing_in_flight_are_fine() {
    run(Case {
        qcow2: false,
        daemon_args: &["--inflight", "off"],
        plan: positive_plan(),
        paused: true,
        expect: Expect::Pass,
    });
}

/// Four SIGKILLs and one SIGTERM (in the middle, so that a daemon started after a clean stop
/// is killed too).
fn positive_plan() -> Vec<Stop> {
    vec![Stop::Kill, Stop::Kill, Stop::Term, Stop::Kill, Stop::Kill]
}

/// The counts of the last whole `GUEST-PROGRESS` line of `console` after byte `from`.
fn progress(console: &str, from: usize) -> Option<BTreeMap<String, u64>> {
    let mut from = from.min(console.len());
    while !console.is_char_boundary(from) {
        from += 1;
    }
    console[from..].lines().rev().find_map(|line| {
        let rest = line.split("GUEST-PROGRESS ").nth(1)?;
        let counts: Option<BTreeMap<String, u64>> = rest
            .split_whitespace()
            .filter(|kv| !kv.starts_with("t=") && !kv.starts_with("stall="))
            .map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect();
        // Writers, flushers and bulk writers; a line cut by kernel messages is skipped.
        counts.filter(|c| c.len() == WRITERS as usize + 4)
    })
}

/// What in the console shows the guest in trouble, if anything.
fn trouble(console: &str) -> Option<String> {
    [
        "GUEST-ERROR",
        "GUEST-RESULT: FAIL",
        "is not a head",
        "I/O error",
        "Call Trace",
    ]
    .into_iter()
    .find_map(|marker| {
        let at = console.find(marker)?;
        Some(console[at..].lines().next().unwrap_or(marker).to_owned())
    })
}

/// Waits (at most 6 s) until the daemon `pid` has had an io_uring worker blocked for 4 ms: a
/// FLUSH (or a write waiting for the disk) in flight long enough for requests the guest sent
/// after it to have completed, so completions are out of order. Returns whether it saw one;
/// without (another I/O engine, another kernel) the caller goes on at once. A kill at a random
/// moment rarely finds completions out of order: on a fast disk a FLUSH takes a millisecond
/// or two, and a TCG guest sends a few hundred requests a second.
fn wait_for_slow_request(pid: u32) -> bool {
    let hold = Duration::from_millis(4);
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > deadline {
            return false;
        }
        if common::io_worker_blocked(pid) {
            if now - *since.get_or_insert(now) >= hold {
                return true;
            }
        } else {
            since = None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Waits (at most 10 s) until every thread of the daemon `pid` has slept for 50 ms: with the
/// guest paused, everything it sent has completed.
fn wait_idle(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut since: Option<Instant> = None;
    while Instant::now() < deadline {
        if common::all_threads_sleep(pid) {
            if since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_millis(50) {
                return true;
            }
        } else {
            since = None;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    false
}

/// The SHA-256 (hex) of `data`, by sha256sum.
fn sha256(dir: &Path, data: &[u8]) -> String {
    let f = dir.join("region.bin");
    std::fs::write(&f, data).unwrap();
    let out = Command::new("sha256sum").arg(&f).output().unwrap();
    std::fs::remove_file(&f).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Waits until a progress line after console byte `from`, then for one where every writer,
/// flusher and bulk writer is further: all of them do I/O, on both queues. `Err` when the guest
/// shows trouble first, or nothing moves for `PROGRESS_TIMEOUT`.
fn wait_moving(vm: &mut Qemu, from: usize) -> Result<(), String> {
    let mut base: Option<BTreeMap<String, u64>> = None;
    let r = vm.wait_console(PROGRESS_TIMEOUT, |c| {
        if let Some(t) = trouble(c) {
            return Some(Err(t));
        }
        let last = progress(c, from)?;
        match &base {
            None => {
                base = Some(last);
                None
            }
            Some(b) => b
                .iter()
                .all(|(k, v)| last.get(k).is_some_and(|n| n > v))
                .then_some(Ok(())),
        }
    });
    r.unwrap_or_else(|e| Err(format!("not every writer and flusher moved: {e}")))
}

fn run(case: Case) {
    if std::env::var_os("VHOST_BLK_SKIP_GUEST").is_some() {
        eprintln!("VHOST_BLK_SKIP_GUEST set: guest restart test skipped");
        return;
    }
    let started = Instant::now();
    let kit = GuestKit::find();
    let dir = tempfile::tempdir().unwrap();
    let img = if case.qcow2 {
        let img = dir.path().join("disk.qcow2");
        let st = Command::new(common::BIN)
            .args(["create", img.to_str().unwrap(), "128M", "--extended-l2"])
            .args(["--cluster-size", "128K"])
            .status()
            .unwrap();
        assert!(st.success());
        img
    } else {
        let img = dir.path().join("disk.raw");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(128 << 20)
            .unwrap();
        img
    };
    let format = if case.qcow2 { "qcow2" } else { "raw" };
    let mut daemon_args = vec!["--format", format, "--num-queues", "2"];
    daemon_args.extend_from_slice(case.daemon_args);

    let initrd = dir.path().join("initrd.cpio");
    let script = INIT
        .replace("@W@", &WRITERS.to_string())
        .replace("@K@", &BLOCKS_PER_WRITER.to_string())
        .replace("@BASE@", &BASE_BLOCK.to_string())
        .replace("@HANG@", &HANG_SECS.to_string());
    kit.initramfs(&script, &initrd);

    // The kill moments are random; a failing run can be replayed with its seed.
    let seed = std::env::var("VHOST_BLK_RESTART_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("VHOST_BLK_RESTART_SEED={seed}");
    let mut rng = Rng::new(seed);

    let socket = dir.path().join("vub.sock");
    let control = dir.path().join("control.sock");
    let console = dir.path().join("console.log");
    // One log per daemon incarnation.
    let log = |n: usize| dir.path().join(format!("daemon-{n}.log"));
    let mut incarnations = 1;
    let mut daemon = Daemon::spawn(&socket, &log(0), &img, &daemon_args);
    let mut vm = Qemu::spawn(&QemuConfig {
        kernel: &kit.kernel,
        initrd: &initrd,
        socket: &socket,
        queues: 2,
        cpus: 2,
        memory: "256M",
        console: &console,
        control: &control,
    });
    let diag = |vm: &Qemu, incarnations: usize| {
        let mut s = format!(
            "VHOST_BLK_RESTART_SEED={seed}\n--- console (tail) ---\n{}\n--- QEMU ---\n{}",
            tail(&vm.console(), 80),
            vm.stderr()
        );
        for n in 0..incarnations {
            let text = std::fs::read_to_string(log(n)).unwrap_or_default();
            s += &format!("\n--- daemon-{n}.log (tail) ---\n{}", tail(&text, 25));
        }
        s
    };

    // QEMU listens on its control socket (the guest's ttyS1) before it boots the guest.
    let mut ctl = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match UnixStream::connect(&control) {
                Ok(s) => break s,
                Err(e) => {
                    if vm.exited().is_some() || Instant::now() > deadline {
                        panic!("no QEMU control socket ({e}):\n{}", diag(&vm, incarnations));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    };

    let running = vm
        .wait_console(Duration::from_secs(300), |c| {
            c.find("GUEST-RUNNING")
                .or(c.find("GUEST-RESULT").map(|_| 0))
        })
        .unwrap_or_else(|e| panic!("the guest did not start: {e}\n{}", diag(&vm, incarnations)));
    let booted = started.elapsed();
    let out = vm.console();
    assert!(!out.contains("insmod"), "a module failed to load:\n{out}");
    assert!(
        out.contains("GUEST-QUEUES 2"),
        "the guest does not see two queues:\n{}",
        diag(&vm, incarnations)
    );

    // Stop and restart the daemon under load, each time once every process in the guest has
    // moved since the previous restart; stop early if the guest shows trouble.
    let mut caught = wait_moving(&mut vm, running).err();
    let mut stops = Vec::new();
    let mut in_flush = Vec::new();
    let mut unlocked_after = Vec::new();
    for &stop in &case.plan {
        if caught.is_some() {
            break;
        }
        // A random moment, then one where a FLUSH is in flight (or, paused, none is).
        std::thread::sleep(Duration::from_millis(200 + rng.below(1300)));
        if case.paused {
            vm.pause();
            assert!(
                wait_idle(daemon.child.id()),
                "the daemon stays busy with the guest paused\n{}",
                diag(&vm, incarnations)
            );
            in_flush.push(false);
        } else {
            in_flush.push(wait_for_slow_request(daemon.child.id()));
        }
        match stop {
            Stop::Kill => {
                daemon.kill();
            }
            Stop::Term => {
                let status = daemon.stop();
                assert!(
                    status.success(),
                    "SIGTERM: {status}\n{}",
                    diag(&vm, incarnations)
                );
            }
        }
        stops.push(stop);
        if case.paused {
            vm.resume();
        }
        // A stopped daemon's image locks outlive it for some milliseconds, until the kernel
        // has torn down its io_uring rings (after a SIGKILL and after a clean exit alike).
        unlocked_after.push(
            common::wait_unlocked(&img, Duration::from_secs(30)).unwrap_or_else(|| {
                panic!(
                    "the image stays locked after {stop:?}\n{}",
                    diag(&vm, incarnations)
                )
            }),
        );
        daemon = Daemon::try_spawn(&socket, &log(incarnations), &img, &daemon_args)
            .unwrap_or_else(|e| panic!("restart: {e}\n{}", diag(&vm, incarnations)));
        incarnations += 1;
        if daemon
            .wait_for_log_within("front-end connected", Duration::from_secs(60))
            .is_none()
        {
            panic!(
                "QEMU did not reconnect after {stop:?}:\n{}",
                diag(&vm, incarnations)
            );
        }
        let from = vm.console().len();
        caught = wait_moving(&mut vm, from).err();
    }
    let load_done = started.elapsed();

    // The guest stops its writers, checks every block and powers off. (It may have done so
    // already after an error.)
    let _ = ctl.write_all(b"stop\n");
    let verdict = vm.wait_console(Duration::from_secs(HANG_SECS as u64 + 240), |c| {
        let at = c.find("GUEST-RESULT: ")?;
        Some(c[at..].lines().next().unwrap().to_owned())
    });
    let qemu_status = vm.wait(Duration::from_secs(30));
    let out = vm.console();
    let not_a_head = out.contains("is not a head");
    let summary = format!(
        "{} stops {stops:?} (in a FLUSH: {in_flush:?}; image unlocked after {unlocked_after:?}), \
         verdict {verdict:?}, trouble {caught:?}; boot {booted:.1?}, load {:.1?}, total {:.1?}",
        stops.len(),
        load_done - booted,
        started.elapsed()
    );
    eprintln!("{summary}");

    if case.expect == Expect::Fail {
        let passed = verdict.as_ref().is_ok_and(|v| v.contains("PASS"));
        assert!(
            !passed && (caught.is_some() || not_a_head || verdict.is_ok()),
            "{} restarts without in-flight tracking went unnoticed: {summary}\n{}",
            stops.len(),
            diag(&vm, incarnations)
        );
        return;
    }

    let verdict = verdict
        .unwrap_or_else(|e| panic!("no verdict ({e}): {summary}\n{}", diag(&vm, incarnations)));
    assert!(
        verdict.contains("PASS") && caught.is_none() && !not_a_head,
        "{summary}\n{}",
        diag(&vm, incarnations)
    );
    assert_eq!(stops, case.plan, "{summary}");
    let qemu_status = qemu_status
        .unwrap_or_else(|| panic!("QEMU did not exit: {summary}\n{}", diag(&vm, incarnations)));
    assert!(
        qemu_status.success(),
        "QEMU: {qemu_status}\n{}",
        diag(&vm, incarnations)
    );
    let status = daemon.stop();
    assert!(
        status.success(),
        "the last daemon's SIGTERM: {status}\n{}",
        diag(&vm, incarnations)
    );

    // The image holds what the guest read.
    let offset = BASE_BLOCK as usize * 4096;
    let len = (WRITERS * BLOCKS_PER_WRITER) as usize * 4096;
    let region = if case.qcow2 {
        assert_eq!(
            common::qemu::qemu_check(&img),
            0,
            "qemu-img check after the restarts"
        );
        common::qemu::qemu_raw(&img)[offset..offset + len].to_vec()
    } else {
        common::file_range(&img, offset as u64, len)
    };
    let guest_sum = out
        .lines()
        .find_map(|l| l.split("GUEST-REGION-SHA256 ").nth(1))
        .map(|s| s.trim().to_owned())
        .expect("the guest printed no region checksum");
    assert_eq!(
        sha256(dir.path(), &region),
        guest_sum,
        "the image differs from what the guest read"
    );
}
