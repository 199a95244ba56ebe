//! The agent's global allocator: mimalloc, called as a C program would call it.
//!
//! glibc's malloc cost the proxy about a tenth of its CPU per request (arena locks and
//! consolidation on the many short-lived buffers of a request); mimalloc's per-thread heaps
//! fit the per-core workers. The `mimalloc` crate's allocator passes every request to
//! `mi_malloc_aligned`, whose fast path (mimalloc 3) only covers blocks up to 1 KiB, and whose
//! slow path over-allocates (and marks the page for a slower free) whenever the size class is
//! not a power of two, even for the 8-byte alignment `mi_malloc` always gives
//! (mimalloc_rust#170): about five of a proxied request's allocations took that path. As
//! Rust's own `System` allocator does with `malloc`, alignments `malloc` guarantees (16 bytes,
//! not more than the size) go to the plain calls.

use std::{
    alloc::{GlobalAlloc, Layout},
    ffi::c_void,
};

use libmimalloc_sys as mi;

/// What `mi_malloc` aligns every block of at least this size to (C's `max_align_t`,
/// mimalloc's `MI_MAX_ALIGN_SIZE`).
const MALLOC_ALIGN: usize = 16;

pub struct MiMalloc;

/// Whether `malloc`'s own alignment serves an allocation of `size` bytes aligned to `align`.
fn plain(align: usize, size: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

/// A block from `plain_call(size)` when `malloc`'s alignment serves `layout`, else from
/// `aligned_call(size, align)`. Inlined with its arguments: no call through a pointer.
#[inline(always)]
unsafe fn new_block(
    layout: Layout,
    plain_call: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_call: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    if plain(align, size) {
        plain_call(size).cast()
    } else {
        aligned_call(size, align).cast()
    }
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` takes blocks from
// the plain and the aligned calls alike); the aligned calls honour any alignment, the plain
// ones only those `plain` admits, which `malloc`'s contract guarantees.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        new_block(layout, mi::mi_malloc, mi::mi_malloc_aligned)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        new_block(layout, mi::mi_zalloc, mi::mi_zalloc_aligned)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            mi::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

/// Returns what the calling thread freed to the OS now. mimalloc keeps freed pages for reuse
/// and purges them on the thread's later allocations: what a sweep held (the idle entries it
/// judges, all of a table's when a flood expires at once) would stay resident between sweeps.
pub fn release_freed_memory() {
    // SAFETY: no preconditions; it only walks the calling thread's heap.
    unsafe { mi::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain calls serve what `malloc` aligns by contract, whatever the size; the rest
    /// (tokio's 128-byte-aligned tasks, blocks smaller than their alignment) is asked for.
    #[test]
    fn only_alignments_malloc_guarantees_take_the_plain_calls() {
        assert!(plain(8, 1500), "above mimalloc's 1 KiB aligned fast path");
        assert!(plain(16, 16) && plain(1, 1) && plain(8, 70_000));
        assert!(!plain(128, 384), "tokio's task cells");
        assert!(!plain(16, 8), "smaller than its alignment");
        assert!(!plain(32, 4096));
    }

    /// Every size and alignment Rust may ask for comes back aligned, keeps its contents
    /// through growing and shrinking, and is zeroed when asked to be.
    #[test]
    fn blocks_are_aligned_as_asked_through_alloc_zeroed_and_realloc() {
        let a = MiMalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 8, 16, 24, 48, 100, 1000, 1025, 1500, 3000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is freed with its own layout.
                unsafe {
                    for new in [size / 2 + 1, size * 3] {
                        let p = a.alloc(layout);
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "alloc {size} aligned {align}");
                        p.write_bytes(0xab, size);
                        let q = a.realloc(p, layout, new);
                        assert_eq!(
                            q as usize % align,
                            0,
                            "realloc {size}->{new} aligned {align}"
                        );
                        let kept = size.min(new);
                        assert!(std::slice::from_raw_parts(q, kept)
                            .iter()
                            .all(|&b| b == 0xab));
                        a.dealloc(q, Layout::from_size_align(new, align).unwrap());
                    }
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "alloc_zeroed {size} aligned {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
