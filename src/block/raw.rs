//! Raw images: guest offset N is file offset N.

use std::os::unix::io::{AsRawFd, RawFd};

use super::file::ImageFile;
use super::{
    check_range, BackendInfo, BlockBackend, BlockError, Extent, HostOp, ImageFormat, Target, Waker,
    WritePlan,
};

/// A raw image.
pub struct RawBackend {
    file: ImageFile,
    info: BackendInfo,
}

impl RawBackend {
    /// Wraps an open file.
    pub fn new(file: ImageFile, read_only: bool, probed_raw: bool) -> Self {
        let info = BackendInfo {
            size: file.size,
            read_only,
            format: ImageFormat::Raw,
            probed_raw,
            mem_align: file.mem_align,
            offset_align: file.offset_align,
            opt_io_size: 0,
        };
        RawBackend { file, info }
    }

    fn fd(&self) -> RawFd {
        self.file.file.as_raw_fd()
    }

    /// Guest bytes `offset..offset+len` are the same bytes of the file.
    fn identity(&self, offset: u64, len: u64) -> Extent {
        Extent {
            len,
            target: Target::Data {
                fd: self.fd(),
                offset,
            },
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        super::check_writable(&self.info, offset, len)
    }
}

impl BlockBackend for RawBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), BlockError> {
        check_range(offset, len, self.info.size)?;
        out.push(self.identity(offset, len));
        Ok(())
    }

    fn begin_write(&self, offset: u64, len: u64, _waker: &Waker) -> Result<WritePlan, BlockError> {
        self.check_write(offset, len)?;
        Ok(WritePlan {
            extents: vec![self.identity(offset, len)],
            ..Default::default()
        })
    }

    fn flush(&self, out: &mut Vec<HostOp>) -> Result<(), BlockError> {
        if !self.info.read_only {
            out.push(HostOp::Sync { fd: self.fd() });
        }
        Ok(())
    }

    fn discard(
        &self,
        offset: u64,
        len: u64,
        unmap_host: bool,
        _waker: &Waker,
        out: &mut Vec<HostOp>,
    ) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        if !unmap_host {
            return Ok(());
        }
        out.push(HostOp::Discard {
            fd: self.fd(),
            offset,
            len,
        });
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        _waker: &Waker,
        out: &mut Vec<HostOp>,
    ) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        out.push(HostOp::Zero {
            fd: self.fd(),
            offset,
            len,
            unmap,
        });
        Ok(())
    }

    fn sync(&self) -> Result<(), BlockError> {
        if !self.info.read_only {
            self.file.file.sync_data()?;
        }
        Ok(())
    }
}
