//! Whole hash maps read with `BPF_MAP_LOOKUP_BATCH`: one syscall per few thousand entries,
//! where aya's `iter()` makes two per entry (next key, then lookup). The sweep reads both
//! conntrack tables every second; with a million-entry table 90% full, the per-entry syscalls
//! kept two thirds of a core busy. Maglev tables (65,537 slots by default) are written with
//! `BPF_MAP_UPDATE_BATCH`, one system call per table rather than one per slot.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;
use aya_obj::generated::bpf_cmd::{BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH};

use crate::sys_bpf::bpf;

/// Entries asked for per call. A hash map's batch never splits a bucket: a bucket with more
/// entries than that fails with ENOSPC, and the call is repeated with room for twice as many.
const CHUNK: usize = 4096;

/// The batch member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `values[i]` at `keys[i]` in map `fd` (whose key and value types are `K` and `V`),
/// all in one system call. On an error a first part of them may be written.
pub fn update<K: Pod, V: Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> io::Result<()> {
    let count = keys.len().min(values.len());
    if count == 0 {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: the attribute points at `count` keys and values of the map's own sizes, alive
    // for the call, which only reads them.
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }.map(drop)
}

/// `f` on every entry of the hash map `fd`, whose key and value types are `K` and `V`.
/// Entries the datapath adds or removes meanwhile may be missed or seen twice, as with
/// `iter()`. On an error `f` may have seen part of the map.
pub fn for_each<K: Pod, V: Pod>(fd: BorrowedFd<'_>, mut f: impl FnMut(K, V)) -> io::Result<()> {
    let mut chunk = CHUNK;
    // SAFETY: Pod types are plain data, valid when zeroed.
    let (zero_k, zero_v): (K, V) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let (mut keys, mut values) = (vec![zero_k; chunk], vec![zero_v; chunk]);
    // Where the next call starts: a bucket index for hash maps (u32); u64 leaves room.
    let (mut start, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        keys.resize(chunk, zero_k);
        values.resize(chunk, zero_v);
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &start as *const u64 as u64
            },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at `count` keys and values of the map's own sizes and
        // at the two tokens, all alive for the call; the kernel writes back `count`.
        let error = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        let n = (attr.count as usize).min(chunk);
        for (k, v) in keys[..n].iter().zip(&values[..n]) {
            f(*k, *v);
        }
        if let Some(e) = error {
            match e.raw_os_error() {
                // The end of the map (with the last entries, if any).
                Some(libc::ENOENT) => return Ok(()),
                Some(libc::ENOSPC) if n == 0 && chunk < 1 << 20 => {
                    chunk *= 2;
                    continue;
                }
                _ => return Err(e),
            }
        }
        start = next;
        first = false;
    }
}
