//! Format probing with QEMU's rule: a file is raw unless its first bytes carry the signature of
//! a known image format. QEMU then restricts guest writes to the first sector of a probed raw
//! image, so that a guest cannot make the file probe as another format (with a backing file
//! pointing anywhere on the host) next time; [`header_signature`] is that check.

/// The outcome of probing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// No known signature.
    Raw,
    /// qcow2 (or qcow version 1/2/3: we report the magic, the engine checks the version).
    Qcow2,
    /// Another format we do not serve.
    Other(&'static str),
}

/// Signatures of image formats QEMU can probe (offset 0 unless noted).
const SIGNATURES: &[(&[u8], &str)] = &[
    (b"QFI\xfb", "qcow2"),
    (b"QED\0", "QED"),
    (b"KDMV", "VMDK"),
    (b"COWD", "VMDK (ESX COW)"),
    (b"# Disk DescriptorFile", "VMDK (descriptor)"),
    (b"conectix", "VPC/VHD"),
    (b"vhdxfile", "VHDX"),
    (b"LUKS\xba\xbe", "LUKS"),
    (b"WithoutFreeSpace", "Parallels"),
    (b"WithouFreSpacExt", "Parallels"),
    (b"Bochs Virtual HD Image", "Bochs"),
    (b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
];

/// VDI keeps its signature at offset 0x40.
const VDI_SIGNATURE: (usize, [u8; 4]) = (0x40, [0x7f, 0x10, 0xda, 0xbe]);

/// Returns the name of the image format whose signature starts `head`, if any.
pub fn header_signature(head: &[u8]) -> Option<&'static str> {
    if let Some((_, name)) = SIGNATURES.iter().find(|(sig, _)| head.starts_with(sig)) {
        return Some(name);
    }
    let (off, sig) = VDI_SIGNATURE;
    if head.get(off..off + 4) == Some(&sig[..]) {
        return Some("VDI");
    }
    None
}

/// Probes the first bytes of an image.
pub fn probe(head: &[u8]) -> Probed {
    match header_signature(head) {
        None => Probed::Raw,
        Some("qcow2") => Probed::Qcow2,
        Some(other) => Probed::Other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_known_signatures() {
        assert_eq!(probe(b""), Probed::Raw);
        assert_eq!(probe(&[0u8; 512]), Probed::Raw);
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03"), Probed::Qcow2);
        assert_eq!(probe(b"KDMV...."), Probed::Other("VMDK"));
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(probe(&vdi), Probed::Other("VDI"));
        assert_eq!(header_signature(b"QFI"), None);
    }
}
