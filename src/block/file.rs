//! Opening image files: access mode, O_DIRECT and its alignment, size of files and block devices.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::lock::{self, Locking, Perms};
use super::{CacheMode, OpenError};
use crate::io::batch::{Batch, BatchWrite};
use crate::io::{sys, IoOp, OpKind};
use crate::util::aligned::AlignedBuf;

/// Bytes read from the start of an image for probing.
pub const HEAD_LEN: usize = 4096;

/// An open image file.
#[derive(Debug)]
pub struct ImageFile {
    /// The file.
    pub file: File,
    /// Its path, for messages.
    pub path: PathBuf,
    /// Size in bytes (files: length; block devices: device size).
    pub size: u64,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// O_DIRECT buffer alignment (1 when buffered).
    pub mem_align: usize,
    /// O_DIRECT offset/length alignment (1 when buffered).
    pub offset_align: u64,
}

impl ImageFile {
    /// Opens `path` for reading (and writing unless `read_only`), with O_DIRECT for
    /// [`CacheMode::None`].
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, OpenError> {
        let direct = cache == CacheMode::None;
        let mut oo = FsOpenOptions::new();
        oo.read(true).write(!read_only);
        if direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let mut file = oo.open(path).map_err(|source| {
            if direct && source.raw_os_error() == Some(libc::EINVAL) {
                OpenError::DirectUnsupported {
                    path: path.to_owned(),
                    source,
                }
            } else {
                OpenError::Open {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        let meta = file.metadata().map_err(|source| OpenError::Open {
            path: path.to_owned(),
            source,
        })?;
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(OpenError::NotAFile(path.to_owned()));
        }
        // Works for regular files and block devices alike.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| OpenError::Read {
                path: path.to_owned(),
                source,
            })?;
        let (mem_align, offset_align) = if direct { dio_alignment(path) } else { (1, 1) };
        Ok(ImageFile {
            file,
            path: path.to_owned(),
            size,
            direct,
            mem_align,
            offset_align,
        })
    }

    /// Takes QEMU-compatible image locks for `perms` on this file's descriptor; they last as
    /// long as this `ImageFile` (see [`lock`]).
    pub fn lock(&self, perms: Perms, mode: Locking) -> Result<(), OpenError> {
        Ok(lock::lock(&self.file, &self.path, perms, mode)?)
    }

    /// Reads up to [`HEAD_LEN`] bytes from the start (fewer if the file is shorter).
    pub fn read_head(&self) -> std::io::Result<Vec<u8>> {
        let len = HEAD_LEN.min(usize::try_from(self.size).unwrap_or(HEAD_LEN));
        let mut buf = vec![0u8; len];
        self.read_into(0, &mut buf)?;
        Ok(buf)
    }

    /// Fills `buf` from `offset`, whatever the O_DIRECT alignment; bytes past the end of the file
    /// read as zeroes. Metadata reads only: data goes through the I/O engines.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if !self.direct {
            return pread_full(self.file.as_raw_fd(), buf, offset);
        }
        let align = self.offset_align.max(self.mem_align as u64);
        read_aligned(self.file.as_raw_fd(), offset, buf, align)
    }

    /// Reads `len` bytes at `offset` into a new buffer (see [`ImageFile::read_into`]).
    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_into(offset, &mut v)?;
        Ok(v)
    }

    /// Overwrites `data` at `offset` and makes it durable. For small metadata updates such as
    /// header fields.
    pub fn write_durable(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.write_at(offset, data)?;
        self.file.sync_data()
    }

    /// Overwrites `data` at `offset` (read-modify-write of the aligned blocks under O_DIRECT,
    /// unless it covers them whole). Metadata writes only; callers serialize writes that share an
    /// aligned block.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        if self.direct {
            let align = self.direct_align();
            let start = offset - offset % align;
            let end = (offset + data.len() as u64).next_multiple_of(align);
            let mut tmp = AlignedBuf::new((end - start) as usize, self.mem_align.max(512));
            if start != offset || end != offset + data.len() as u64 {
                pread_full(fd, tmp.as_mut_slice(), start)?;
            }
            let skip = (offset - start) as usize;
            tmp.as_mut_slice()[skip..skip + data.len()].copy_from_slice(data);
            pwrite_full(fd, tmp.as_slice(), start)
        } else {
            pwrite_full(fd, data, offset)
        }
    }

    /// The same file opened again for writing without O_DIRECT (through `/proc/self/fd`, so it
    /// is this very file whatever happened to its path since). Takes no image locks.
    pub fn reopen_buffered(&self) -> std::io::Result<File> {
        FsOpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Alignment of offsets and lengths (and buffers) of O_DIRECT transfers.
    fn direct_align(&self) -> u64 {
        self.offset_align.max(self.mem_align as u64)
    }

    /// Overwrites each `(offset, bytes)`: metadata writes, run as one [`Batch`] (overlapping on
    /// the device under O_DIRECT) where they are aligned for the file, by [`ImageFile::write_at`]
    /// otherwise. All have been tried when this returns; the first error is returned.
    pub fn write_runs<'a>(
        &self,
        batch: &mut Batch,
        runs: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> std::io::Result<()> {
        let align = if self.direct { self.direct_align() } else { 1 };
        let mut writes = Vec::new();
        let mut result = Ok(());
        for (offset, data) in runs {
            if offset % align == 0 && data.len() as u64 % align == 0 {
                let mut buf = AlignedBuf::new(data.len(), self.mem_align.max(8));
                buf.as_mut_slice().copy_from_slice(data);
                writes.push(BatchWrite {
                    fd: self.file.as_raw_fd(),
                    offset,
                    buf,
                });
            } else if let Err(e) = self.write_at(offset, data) {
                result = result.and(Err(e));
            }
        }
        let ran = batch.run(writes);
        result.and(ran)
    }
}

/// Fills `buf` from `offset` of `fd` through a buffer aligned to `align` in memory, offset and
/// length: safe whether or not the file was opened with O_DIRECT.
pub fn read_aligned(
    fd: libc::c_int,
    offset: u64,
    buf: &mut [u8],
    align: u64,
) -> std::io::Result<()> {
    let start = offset - offset % align;
    let end = (offset + buf.len() as u64).next_multiple_of(align);
    let mut tmp = AlignedBuf::new((end - start) as usize, align.max(512) as usize);
    pread_full(fd, tmp.as_mut_slice(), start)?;
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&tmp.as_slice()[skip..skip + buf.len()]);
    Ok(())
}

impl ImageFile {
    /// Allocates `offset..offset+len` (reading as zeroes), growing the file if needed.
    pub fn fallocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut op = IoOp {
            fd: self.file.as_raw_fd(),
            offset,
            kind: OpKind::Fallocate { mode: 0, len },
            iov: Vec::new(),
            tag: 0,
        };
        match sys::execute(&mut op) {
            r if r < 0 => Err(std::io::Error::from_raw_os_error(-r)),
            _ => Ok(()),
        }
    }
}

/// Whether `offset..offset+len` of `fd` is a hole (reads as zeroes without storage), per
/// `SEEK_DATA`. False where the file system cannot tell.
pub fn is_hole(fd: libc::c_int, offset: u64, len: u64) -> bool {
    let Ok(start) = libc::off_t::try_from(offset) else {
        return false;
    };
    // SAFETY: lseek only moves this descriptor's file position, which no one else relies on
    // (all data I/O is positional).
    let next = unsafe { libc::lseek(fd, start, libc::SEEK_DATA) };
    if next < 0 {
        // ENXIO: no data at or after `offset`.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next as u64 >= offset.saturating_add(len)
}

/// One blocking transfer of a whole buffer through the I/O layer's system-call path (short
/// transfers finished, EINTR retried, reads past the end of the file give zeroes).
fn transfer(
    fd: libc::c_int,
    ptr: *mut u8,
    len: usize,
    offset: u64,
    kind: OpKind,
) -> std::io::Result<()> {
    let mut op = IoOp {
        fd,
        offset,
        kind,
        iov: vec![libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        }],
        tag: 0,
    };
    match sys::execute(&mut op) {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(-e)),
    }
}

/// Reads all of `buf` from `offset` (zeroes past the end of the file).
pub(crate) fn pread_full(fd: libc::c_int, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    transfer(fd, buf.as_mut_ptr(), buf.len(), offset, OpKind::Read)
}

fn pwrite_full(fd: libc::c_int, buf: &[u8], offset: u64) -> std::io::Result<()> {
    // Writes only read from the buffer.
    transfer(
        fd,
        buf.as_ptr() as *mut u8,
        buf.len(),
        offset,
        OpKind::Write,
    )
}

/// O_DIRECT alignment from `statx(STATX_DIOALIGN)`, or a conservative 4096 where the kernel or
/// file system does not say.
fn dio_alignment(path: &Path) -> (usize, u64) {
    const FALLBACK: u32 = 4096;
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (FALLBACK as usize, u64::from(FALLBACK));
    };
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `cpath` is a valid NUL-terminated string and `stx` a valid out-pointer.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            cpath.as_ptr(),
            0,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0
        && stx.stx_mask & libc::STATX_DIOALIGN != 0
        && stx.stx_dio_mem_align.is_power_of_two()
        && stx.stx_dio_offset_align.is_power_of_two()
    {
        (
            stx.stx_dio_mem_align as usize,
            u64::from(stx.stx_dio_offset_align),
        )
    } else {
        (FALLBACK as usize, u64::from(FALLBACK))
    }
}
