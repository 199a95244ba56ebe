//! The `bpf(2)` commands aya 0.14 does not wrap (batch lookups, a pinned link's interface)
//! go through this one call.

use std::{io, mem::size_of};

use aya_obj::generated::bpf_cmd;

/// `bpf(cmd, attr, sizeof attr)`: the syscall's result, or its errno as the error.
///
/// # Safety
/// `attr` must be the member of `union bpf_attr` that `cmd` reads, and every pointer in it
/// must be valid, for the sizes it gives, for the duration of the call.
pub unsafe fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<i64> {
    // SAFETY: the caller's contract.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
