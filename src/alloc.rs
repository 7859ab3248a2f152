//! The daemon's global allocator: glibc's malloc, except that large buffers (block
//! buffers, mostly) are whole page mappings of their own. A page-aligned buffer lets
//! the local store read a block file with `O_DIRECT` straight into it (the disk's DMA
//! needs aligned memory; malloc aligns to 16 bytes), which spares the copy out of the
//! page cache on every cold read. It is also what glibc does for these sizes anyway
//! (its chunks above the mmap threshold are mappings too, offset by a 16-byte header),
//! so memory use and munmap behaviour stay as they were.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;

/// Allocations of at least this many bytes get a mapping of their own.
pub const LARGE: usize = 256 << 10;
/// Alignment of every large allocation.
pub const PAGE: usize = 4096;

pub struct PageAlignedLarge;

fn is_large(size: usize, align: usize) -> bool {
    size >= LARGE && align <= PAGE
}

/// `size` rounded up to whole pages.
pub fn page_round(size: usize) -> usize {
    size.div_ceil(PAGE) * PAGE
}

unsafe fn map(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping touches no existing memory.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            page_round(size),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        ptr::null_mut()
    } else {
        p.cast()
    }
}

// SAFETY: every pointer handed out is either System's (small) or a fresh mapping of at
// least the requested size, aligned to PAGE (large); which one is decided by the
// layout alone, so dealloc and realloc always route a pointer back to its source.
unsafe impl GlobalAlloc for PageAlignedLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size(), layout.align()) {
            unsafe { map(layout.size()) }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size(), layout.align()) {
            // Fresh anonymous pages are zero, and stay unbacked until touched.
            unsafe { map(layout.size()) }
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if is_large(layout.size(), layout.align()) {
            // SAFETY: p is a mapping of page_round(size) bytes made by map().
            unsafe { libc::munmap(p.cast(), page_round(layout.size())) };
        } else {
            unsafe { System.dealloc(p, layout) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let was_large = is_large(layout.size(), layout.align());
        let now_large = is_large(new_size, layout.align());
        match (was_large, now_large) {
            (false, false) => unsafe { System.realloc(p, layout, new_size) },
            (true, true) => {
                // SAFETY: p is a mapping of page_round(old size) bytes; mremap moves
                // it whole if it cannot grow in place (no copy of the pages).
                let q = unsafe {
                    libc::mremap(
                        p.cast(),
                        page_round(layout.size()),
                        page_round(new_size),
                        libc::MREMAP_MAYMOVE,
                    )
                };
                if q == libc::MAP_FAILED {
                    ptr::null_mut()
                } else {
                    q.cast()
                }
            }
            _ => {
                // Crossing the threshold: move between the two sources.
                // SAFETY: Layout::from_size_align_unchecked is valid because the
                // caller guarantees new_size with layout.align() forms a valid layout.
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                let q = unsafe { self.alloc(new_layout) };
                if !q.is_null() {
                    unsafe {
                        ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                }
                q
            }
        }
    }
}

/// Whether a buffer's memory is aligned for `O_DIRECT` reads.
pub fn is_page_aligned(p: *const u8) -> bool {
    (p as usize).is_multiple_of(PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_page_aligned_zeroed_and_survive_growing_and_shrinking() {
        let a = PageAlignedLarge;
        unsafe {
            let l = Layout::from_size_align(LARGE + 5, 1).unwrap();
            let p = a.alloc_zeroed(l);
            assert!(is_page_aligned(p));
            assert!(
                std::slice::from_raw_parts(p, l.size())
                    .iter()
                    .all(|&b| b == 0)
            );
            for i in 0..l.size() {
                *p.add(i) = i as u8;
            }
            // Grow (mremap), shrink below the threshold (System), grow back (mapping).
            let p = a.realloc(p, l, 3 * LARGE);
            assert!(is_page_aligned(p));
            let small = Layout::from_size_align(3 * LARGE, 1).unwrap();
            let p = a.realloc(p, small, 1000);
            let p = a.realloc(p, Layout::from_size_align(1000, 1).unwrap(), LARGE);
            assert!(is_page_aligned(p));
            for i in 0..1000 {
                assert_eq!(*p.add(i), i as u8);
            }
            a.dealloc(p, Layout::from_size_align(LARGE, 1).unwrap());
            let q = a.alloc(Layout::from_size_align(100, 8).unwrap());
            assert!(!q.is_null());
            a.dealloc(q, Layout::from_size_align(100, 8).unwrap());
        }
    }
}
