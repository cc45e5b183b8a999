//! Opening image files: access mode, O_DIRECT and its alignment, size of files and block devices.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::{CacheMode, OpenError};
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

    /// Reads up to [`HEAD_LEN`] bytes from the start (fewer if the file is shorter).
    pub fn read_head(&self) -> std::io::Result<Vec<u8>> {
        let mut buf = AlignedBuf::new(HEAD_LEN, HEAD_LEN);
        let mut done = 0;
        while done < HEAD_LEN {
            // SAFETY: the destination lies inside `buf`, which outlives the call; the buffer and
            // offsets stay aligned for O_DIRECT because reads return whole blocks until EOF.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    buf.as_mut_ptr().add(done).cast(),
                    HEAD_LEN - done,
                    done as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        Ok(buf.as_slice()[..done].to_vec())
    }
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
