//! Copies written element by element. LLVM 22's BPF backend inlines a struct or array copy of
//! a few stores but turns a longer one, or one whose alignment it does not know (anything into
//! the packet), into a call to the object's byte-loop `memcpy`: a BPF subprogram call and one
//! loop iteration per byte (a MAC copy so compiled cost 19 ns per packet, measured). Volatile
//! stores keep LLVM from merging these back into a `memcpy`.

/// `*dst = *src`, one `T` at a time.
///
/// # Safety
/// `dst` is valid for writes of `[T; N]` and aligned for `T`.
#[inline(always)]
pub unsafe fn elements<T: Copy, const N: usize>(dst: *mut [T; N], src: &[T; N]) {
    let dst = dst.cast::<T>();
    for (i, v) in src.iter().enumerate() {
        // SAFETY: `i` < N; the caller vouches for `dst`.
        unsafe { dst.add(i).write_volatile(*v) };
    }
}

/// `*dst = *src` for a map value made of whole, aligned 64-bit words.
///
/// # Safety
/// `dst` is valid for writes of a `T`.
#[inline(always)]
pub unsafe fn words<T: Copy, const N: usize>(dst: *mut T, src: &T) {
    const { assert!(size_of::<T>() == N * 8 && align_of::<T>() >= 8) };
    // SAFETY: `T` is exactly N aligned u64 words (asserted above).
    unsafe {
        elements(
            dst.cast::<[u64; N]>(),
            &*(src as *const T).cast::<[u64; N]>(),
        )
    };
}
