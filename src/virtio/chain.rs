//! Reading a descriptor chain from its head index, for chains not popped from the avail ring
//! (requests resubmitted after a restart: virtio-queue builds chains only from the avail ring).
//!
//! The walk follows virtio-queue's rules: a descriptor with INDIRECT switches to its table (no
//! nesting, a length that is a multiple of 16), and the chain ends at a descriptor without NEXT.
//! A walk longer than `max` descriptors, an index outside the table, or unreadable memory
//! ends it with the descriptors read so far; [`super::request::parse`] then finds the chain
//! broken (its last descriptor still says NEXT, or there is none).

use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// The descriptors of the chain whose head is `head` in the table at `table` of `size` entries.
pub fn read_chain<M: GuestMemoryBackend>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
    max: usize,
) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let (mut table, mut size, mut index) = (table, size, head);
    let mut indirect = false;
    while out.len() < max {
        if index >= size {
            break;
        }
        let Some(d) = table
            .checked_add(16 * u64::from(index))
            .and_then(|a| mem.read_obj::<Descriptor>(a).ok())
        else {
            break;
        };
        if d.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
            let entries = d.len() / 16;
            if indirect || d.len() % 16 != 0 || entries == 0 || entries > u32::from(u16::MAX) {
                // Reported as broken: a descriptor that still says there is more.
                out.push(d);
                if !d.has_next() {
                    out.push(Descriptor::new(0, 0, 1, 0));
                }
                break;
            }
            indirect = true;
            table = GuestAddress(d.addr().raw_value());
            size = entries as u16;
            index = 0;
            continue;
        }
        out.push(d);
        if !d.has_next() {
            break;
        }
        index = d.next();
    }
    out
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(m: &GuestMemoryMmap, at: u64, d: Descriptor) {
        m.write_obj(d, GuestAddress(at)).unwrap();
    }

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    #[test]
    fn direct_and_indirect_chains() {
        let m = mem();
        put(&m, 16 * 2, Descriptor::new(0x1000, 16, NEXT, 5));
        put(&m, 16 * 5, Descriptor::new(0x2000, 512, NEXT, 1));
        put(&m, 16, Descriptor::new(0x3000, 1, WRITE, 0));
        let c = read_chain(&m, GuestAddress(0), 8, 2, 16);
        assert_eq!(
            c.iter().map(|d| d.addr().0).collect::<Vec<_>>(),
            [0x1000, 0x2000, 0x3000]
        );
        // An indirect table of two at 0x800.
        put(
            &m,
            16 * 3,
            Descriptor::new(0x800, 32, VRING_DESC_F_INDIRECT as u16, 0),
        );
        put(&m, 0x800, Descriptor::new(0x4000, 16, NEXT, 1));
        put(&m, 0x810, Descriptor::new(0x5000, 1, WRITE, 0));
        let c = read_chain(&m, GuestAddress(0), 8, 3, 16);
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].addr().0, 0x5000);
    }

    #[test]
    fn loops_bad_indexes_and_nesting_end_the_walk() {
        let m = mem();
        // A loop: bounded by max, the last still says NEXT.
        put(&m, 0, Descriptor::new(0x1000, 16, NEXT, 1));
        put(&m, 16, Descriptor::new(0x1000, 16, NEXT, 0));
        let c = read_chain(&m, GuestAddress(0), 8, 0, 5);
        assert_eq!(c.len(), 5);
        assert!(c.last().unwrap().has_next());
        // next past the table.
        put(&m, 32, Descriptor::new(0x1000, 16, NEXT, 9));
        assert!(read_chain(&m, GuestAddress(0), 8, 2, 16)
            .last()
            .unwrap()
            .has_next());
        // Head past the table.
        assert!(read_chain(&m, GuestAddress(0), 8, 8, 16).is_empty());
        // Nested indirect and a table of odd length.
        put(
            &m,
            48,
            Descriptor::new(0x900, 16, VRING_DESC_F_INDIRECT as u16, 0),
        );
        put(
            &m,
            0x900,
            Descriptor::new(0x900, 16, VRING_DESC_F_INDIRECT as u16, 0),
        );
        assert!(read_chain(&m, GuestAddress(0), 8, 3, 16)
            .last()
            .unwrap()
            .has_next());
        put(
            &m,
            64,
            Descriptor::new(0x900, 17, VRING_DESC_F_INDIRECT as u16, 0),
        );
        assert!(read_chain(&m, GuestAddress(0), 8, 4, 16)
            .last()
            .unwrap()
            .has_next());
        // A table outside memory.
        assert!(read_chain(&m, GuestAddress(u64::MAX - 8), 8, 0, 16).is_empty());
    }
}
