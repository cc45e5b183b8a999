use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use super::*;

fn engines() -> Vec<Engine> {
    let mut v = vec![Engine::new(AioMode::Threads, 16).unwrap()];
    if let Ok(e) = Engine::new(AioMode::IoUring, 16) {
        v.push(e);
    }
    v
}

fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

fn run(engine: &mut Engine, ops: Vec<IoOp>) -> Vec<Completion> {
    let n = ops.len();
    for op in ops {
        engine.push(op);
    }
    engine.submit();
    let mut out = Vec::new();
    while out.len() < n {
        engine.wait(&mut out);
    }
    assert_eq!(engine.in_flight(), 0);
    out.sort_by_key(|c| c.tag);
    out
}

#[test]
fn engines_write_read_scatter_gather() {
    for mut engine in engines() {
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        let mut a = vec![0xaau8; 3000];
        let mut b = vec![0xbbu8; 5192];
        let w = IoOp {
            fd,
            offset: 4096,
            kind: OpKind::Write,
            iov: vec![iov(&mut a), iov(&mut b)],
            tag: 7,
        };
        assert_eq!(
            run(&mut engine, vec![w]),
            vec![Completion { tag: 7, result: 0 }]
        );

        let mut back = vec![0u8; 8192];
        file.read_exact_at(&mut back, 4096).unwrap();
        assert!(back[..3000].iter().all(|&x| x == 0xaa));
        assert!(back[3000..].iter().all(|&x| x == 0xbb));

        let mut r1 = vec![0u8; 100];
        let mut r2 = vec![0u8; 8092];
        let r = IoOp {
            fd,
            offset: 4096,
            kind: OpKind::Read,
            iov: vec![iov(&mut r1), iov(&mut r2)],
            tag: 9,
        };
        let s = IoOp {
            fd,
            offset: 0,
            kind: OpKind::Fdatasync,
            iov: Vec::new(),
            tag: 10,
        };
        let done = run(&mut engine, vec![r, s]);
        assert_eq!(
            done.iter().map(|c| c.result).collect::<Vec<_>>(),
            [0, 0],
            "{}",
            engine.name()
        );
        assert_eq!([r1, r2].concat(), back);
    }
}

#[test]
fn engines_read_past_end_of_file_gives_zeroes() {
    for mut engine in engines() {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&[1u8; 1000], 0).unwrap();
        let mut buf = vec![0xffu8; 4096];
        let op = IoOp {
            fd: file.as_raw_fd(),
            offset: 512,
            kind: OpKind::Read,
            iov: vec![iov(&mut buf)],
            tag: 1,
        };
        assert_eq!(run(&mut engine, vec![op])[0].result, 0);
        assert!(buf[..488].iter().all(|&x| x == 1));
        assert!(buf[488..].iter().all(|&x| x == 0), "{}", engine.name());
    }
}

#[test]
fn engines_report_errors_and_fallocate() {
    for mut engine in engines() {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&[9u8; 65536], 0).unwrap();
        let punch = IoOp {
            fd: file.as_raw_fd(),
            offset: 4096,
            kind: OpKind::Fallocate {
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                len: 8192,
            },
            iov: Vec::new(),
            tag: 1,
        };
        let bad = IoOp {
            fd: -1,
            offset: 0,
            kind: OpKind::Fdatasync,
            iov: Vec::new(),
            tag: 2,
        };
        let done = run(&mut engine, vec![punch, bad]);
        assert_eq!(done[0].result, 0);
        assert_eq!(done[1].result, -libc::EBADF);
        let mut back = vec![0u8; 65536];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back[4096..12288].iter().all(|&x| x == 0));
        assert!(back[..4096].iter().chain(&back[12288..]).all(|&x| x == 9));
        assert_eq!(file.metadata().unwrap().len(), 65536);
    }
}

#[test]
fn transfer_advance_splits_iovecs() {
    let mut a = [0u8; 10];
    let mut b = [0u8; 10];
    let mut v = vec![iov(&mut a), iov(&mut b)];
    Transfer::advance(&mut v, 13);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].iov_len, 7);
    assert_eq!(v[0].iov_base as usize, b.as_ptr() as usize + 3);
    let _ = File::open("/dev/null");
}
