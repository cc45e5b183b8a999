use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use super::*;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn file_with(data: &[u8]) -> File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(data).unwrap();
    f
}

fn iovecs(bufs: &mut [Vec<u8>]) -> Vec<libc::iovec> {
    bufs.iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect()
}

/// Reads `offset..offset + len` through `maps` into one buffer.
fn read(maps: &mut MappedFiles, fd: RawFd, offset: u64, len: usize) -> Option<Vec<u8>> {
    let mut bufs = [vec![0u8; len]];
    let iov = iovecs(&mut bufs);
    // SAFETY: the iovec describes `bufs`, alive and unborrowed during the call.
    unsafe { maps.read(fd, offset, &iov) }.then(|| bufs[0].clone())
}

#[test]
fn copies_file_bytes_into_scattered_buffers() {
    let data = pattern(64 << 10, 7);
    let f = file_with(&data);
    let mut maps = MappedFiles::new().unwrap();
    let mut bufs = [vec![0u8; 100], vec![0u8; 5000], vec![0u8; 4996]];
    let iov = iovecs(&mut bufs);
    // SAFETY: the iovecs describe `bufs`, alive and unborrowed during the call.
    assert!(unsafe { maps.read(f.as_raw_fd(), 5000, &iov) });
    assert_eq!(bufs.concat(), &data[5000..15096]);
}

#[test]
fn leaves_reads_past_the_end_and_other_files_to_the_engine() {
    let f = file_with(&pattern(8192, 1));
    let mut maps = MappedFiles::new().unwrap();
    assert!(read(&mut maps, f.as_raw_fd(), 4096, 4096).is_some());
    assert!(read(&mut maps, f.as_raw_fd(), 4096, 4097).is_none());
    assert!(read(&mut maps, f.as_raw_fd(), u64::MAX - 10, 4096).is_none());
    let zero = File::open("/dev/zero").unwrap();
    assert!(read(&mut maps, zero.as_raw_fd(), 0, 512).is_none());
}

#[test]
fn follows_a_growing_file_past_the_first_mapping() {
    let f = file_with(&pattern(4096, 2));
    let mut maps = MappedFiles::new().unwrap();
    assert!(read(&mut maps, f.as_raw_fd(), 0, 4096).is_some());
    let far = MAP_STEP + 8192;
    let data = pattern(4096, 3);
    f.write_all_at(&data, far).unwrap();
    assert_eq!(read(&mut maps, f.as_raw_fd(), far, 4096).unwrap(), data);
    assert_eq!(
        read(&mut maps, f.as_raw_fd(), 0, 4096).unwrap(),
        pattern(4096, 2)
    );
}

#[test]
fn survives_a_file_shrunk_under_its_mapping() {
    let page = page_size();
    let f = file_with(&pattern(3 * page, 4));
    let mut maps = MappedFiles::new().unwrap();
    let third = 2 * page as u64;
    assert!(read(&mut maps, f.as_raw_fd(), third, page).is_some());
    // Another process truncates the image: the mapping still believes in three pages, and the
    // copy faults (without the handler, SIGBUS ends the test process).
    f.set_len(page as u64).unwrap();
    assert!(read(&mut maps, f.as_raw_fd(), third, page).is_none());
    // The patched page was mapped back: new data written there is read, not zeroes.
    let data = pattern(page, 5);
    f.write_all_at(&data, third).unwrap();
    assert_eq!(read(&mut maps, f.as_raw_fd(), third, page).unwrap(), data);
}

#[test]
fn faults_outside_a_copy_still_end_the_process() {
    let _maps = MappedFiles::new().unwrap();
    let f = tempfile::tempfile().unwrap();
    // SAFETY: a new shared mapping of an empty file: every access past its end faults.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the child only reads the mapping and exits; the parent only waits.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            std::ptr::read_volatile(p.cast::<u8>());
            libc::_exit(0);
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFSIGNALED(status), "child status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGBUS);
        libc::munmap(p, 4096);
    }
}

#[test]
fn a_read_from_disk_sends_the_next_reads_to_the_engine() {
    // On a disk-backed file system (the source tree), so that pages can be dropped.
    let mut f = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    f.write_all(&pattern(1 << 20, 6)).unwrap();
    f.sync_all().unwrap();
    // Dropped before anything maps the file (a mapped folio stays cached).
    // SAFETY: posix_fadvise only drops clean cached pages of the file.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
    let mut maps = MappedFiles::new().unwrap();
    maps.slow = Duration::ZERO;
    let before = major_faults();
    let at = 512 << 10;
    assert_eq!(
        read(&mut maps, f.as_raw_fd(), at, 4096).unwrap(),
        pattern(1 << 20, 6)[at as usize..][..4096]
    );
    assert!(major_faults() > before, "the page was not read from disk");
    for _ in 0..MIN_SKIP {
        assert!(read(&mut maps, f.as_raw_fd(), at, 4096).is_none());
    }
    // Cached now: no major fault, and the mapping stays in use.
    assert!(read(&mut maps, f.as_raw_fd(), at, 4096).is_some());
    assert_eq!(maps.skip, 0);
    assert!(read(&mut maps, f.as_raw_fd(), at, 4096).is_some());
}

#[test]
fn skip_periods_double_while_faults_recur_and_reset_after_clean_copies() {
    let mut maps = MappedFiles::new().unwrap();
    maps.note(true);
    assert_eq!(maps.skip, MIN_SKIP);
    maps.note(true);
    assert_eq!(maps.skip, 2 * MIN_SKIP);
    for _ in 0..20 {
        maps.note(true);
    }
    assert_eq!(maps.skip, MAX_SKIP);
    for _ in 0..CLEAN_RESET {
        maps.note(false);
    }
    maps.note(true);
    assert_eq!(maps.skip, MIN_SKIP);
}
