//! New connections spread over the L7 workers by their load, not by a hash.
//!
//! Each worker listens on a socket of its own in the listener's SO_REUSEPORT group, and the
//! kernel's default is to pick one by a hash of the connection's 4-tuple: blind to load, so at
//! any moment one worker holds a few connections more than another and its requests wait
//! longer (nginx's workers share one socket, and an idle one accepts). Here an `SK_REUSEPORT`
//! program (`lb-ebpf/src/reuseport.rs`, one copy per listener) gives each new connection to
//! the worker with fewer open and queued connections, as the workers and the program count
//! them in a memory-mapped array map: relaxed atomics, no system call. Queued ones matter when
//! a worker does not run for a while (its CPU taken by softirqs or another process): its
//! queue grows and new connections go to the others instead of waiting behind it.
//!
//! Measured on the 2-core l7 bench setup (wrk -c64, workers pinned, 8-10 alternations): p99
//! with a new connection per request 6.36 → 5.59 ms (7.23 → 5.42 ms with the agent restarted
//! before each run); over keep-alive the same within noise. Counting queued connections too,
//! with a busy loop on one of the two CPUs (4 alternations): 9,715-11,473 → 10,362-13,251
//! requests/s, p99 10.8-13.4 → 8.7-11.8 ms (nginx 10,340-13,336, 8.8-11.3 ms).

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use aya::{
    maps::{Map, MapData, ReusePortSockArray},
    programs::SkReuseport,
    Ebpf, EbpfLoader,
};
use lb_common::reuseport::{
    WorkerLoad, MAX_WORKERS, PROG_PICK_WORKER, WORKERS_GLOBAL, WORKER_LOAD, WORKER_SOCKETS,
};

/// The object `build.rs` produced (empty when built with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-reuseport"));

#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    #[error("this lb-agent was built without its BPF programs (AYA_BUILD_SKIP)")]
    NotBuilt,
    #[error("{0} workers: the selector takes 1 to {MAX_WORKERS}")]
    Workers(usize),
    #[error("loading the selector: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the selector program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("the selector's sockets: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("the object has no {0}")]
    Missing(&'static str),
    #[error("mapping the workers' load: {0}")]
    Mmap(#[source] io::Error),
}

/// The open connections of a listener's workers, one counter each: in the selector's map when
/// one balances them, else in plain memory (still reported by `/metrics`).
pub struct Loads {
    counts: Counts,
    workers: usize,
}

enum Counts {
    /// `WORKER_LOAD`'s elements, with the selector's program and maps.
    Mapped {
        counts: Mapping,
        _selector: Ebpf,
    },
    Heap(Box<[WorkerLoad]>),
}

/// A BPF_F_MMAPABLE array map's elements, mapped into this process.
struct Mapping(NonNull<WorkerLoad>);

// SAFETY: the mapping is only touched through atomics (`Loads::counter`).
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

/// Bytes of the whole `WORKER_LOAD` array.
const MAPPED: usize = MAX_WORKERS as usize * size_of::<WorkerLoad>();

impl Mapping {
    /// Maps the whole of `map`, shared with the kernel. Its memory starts zeroed: no
    /// connections.
    fn new(map: &MapData) -> Result<Self, BalanceError> {
        // SAFETY: a fresh shared mapping of the map's descriptor; nothing else is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAPPED,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(BalanceError::Mmap(io::Error::last_os_error()));
        }
        NonNull::new(base.cast())
            .map(Self)
            .ok_or(BalanceError::Missing(WORKER_LOAD))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, no longer referenced (every `Worker` is gone).
        unsafe { libc::munmap(self.0.as_ptr().cast(), MAPPED) };
    }
}

impl Loads {
    /// Counters for `workers` workers whose connections the kernel spreads by hash.
    pub fn unbalanced(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: Counts::Heap((0..workers).map(|_| WorkerLoad::default()).collect()),
            workers,
        })
    }

    /// Loads a selector for one listener whose worker `i` listens on `sockets[i]` (all bound
    /// with SO_REUSEPORT to the same address) and attaches it to their group.
    pub fn balanced<S: AsFd>(sockets: &[S]) -> Result<Arc<Self>, BalanceError> {
        if OBJECT.is_empty() {
            return Err(BalanceError::NotBuilt);
        }
        let workers = u32::try_from(sockets.len())
            .ok()
            .filter(|n| (1..=MAX_WORKERS).contains(n))
            .ok_or(BalanceError::Workers(sockets.len()))?;
        let mut ebpf = EbpfLoader::new()
            .override_global(WORKERS_GLOBAL, &workers, true)
            .load(OBJECT)?;
        let mut socks = ReusePortSockArray::try_from(
            ebpf.map_mut(WORKER_SOCKETS)
                .ok_or(BalanceError::Missing(WORKER_SOCKETS))?,
        )?;
        for (i, s) in (0..).zip(sockets) {
            socks.set(i, &s.as_fd().as_raw_fd(), 0)?;
        }
        let Some(Map::Array(load)) = ebpf.map(WORKER_LOAD) else {
            return Err(BalanceError::Missing(WORKER_LOAD));
        };
        let mapping = Mapping::new(load)?;
        let prog: &mut SkReuseport = ebpf
            .program_mut(PROG_PICK_WORKER)
            .ok_or(BalanceError::Missing(PROG_PICK_WORKER))?
            .try_into()?;
        prog.load()?;
        // Through any socket: the program is the group's.
        prog.attach(sockets[0].as_fd())?;
        Ok(Arc::new(Self {
            counts: Counts::Mapped {
                counts: mapping,
                _selector: ebpf,
            },
            workers: sockets.len(),
        }))
    }

    /// Each worker's counter, in order.
    pub fn workers(self: &Arc<Self>) -> Vec<Arc<Worker>> {
        (0..self.workers)
            .map(|index| {
                Arc::new(Worker {
                    loads: self.clone(),
                    index,
                })
            })
            .collect()
    }

    /// Open connections of each worker, in order.
    pub fn connections(&self) -> Vec<u64> {
        (0..self.workers)
            .map(|i| self.counter(i).load(Ordering::Relaxed))
            .collect()
    }

    /// Connections queued on each worker's socket (as far as the counts know), in order.
    pub fn queued(&self) -> Vec<u64> {
        (0..self.workers)
            .map(|i| self.queued_on(i).load(Ordering::Relaxed))
            .collect()
    }

    fn counter(&self, worker: usize) -> &AtomicU64 {
        // SAFETY: see `slot`; the program only reads this field.
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.slot(worker)).connections)) }
    }

    fn queued_on(&self, worker: usize) -> &AtomicU64 {
        // SAFETY: see `slot`; the program updates this field with atomic adds.
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.slot(worker)).queued)) }
    }

    /// Worker `worker`'s element: in the mapping (MAX_WORKERS elements) or the heap array,
    /// living as long as `self`, its fields aligned words only ever accessed atomically.
    fn slot(&self, worker: usize) -> *mut WorkerLoad {
        let base = match &self.counts {
            Counts::Mapped { counts, .. } => counts.0.as_ptr(),
            Counts::Heap(counts) => counts.as_ptr().cast_mut(),
        };
        assert!(worker < self.workers);
        // SAFETY: in bounds (above).
        unsafe { base.add(worker) }
    }
}

/// Leaves the group `socket` is in to the kernel's hash: a failed `balanced` must not leave an
/// earlier proxy's selector steering new connections to its sockets, which are about to close.
pub fn detach(socket: impl AsFd) {
    // Nothing attached (ENOENT) is as good.
    let _ = SkReuseport::detach(socket);
}

impl std::fmt::Debug for Loads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loads")
            .field("balanced", &matches!(self.counts, Counts::Mapped { .. }))
            .field("connections", &self.connections())
            .field("queued", &self.queued())
            .finish()
    }
}

/// One worker's counter.
pub struct Worker {
    loads: Arc<Loads>,
    index: usize,
}

impl Worker {
    /// Counts a connection this worker accepted, until the returned guard is dropped; it is no
    /// longer queued.
    pub fn open(self: &Arc<Self>) -> Open {
        self.loads
            .counter(self.index)
            .fetch_add(1, Ordering::Relaxed);
        // Never below zero: `queue_empty` may have cleared what this accept was counted in.
        let _ = self.loads.queued_on(self.index).fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |q| q.checked_sub(1),
        );
        Open(self.clone())
    }

    /// The worker found its socket's queue empty: nothing is queued on it, whatever the
    /// count says (a connection the program counted whose handshake never completed, or one
    /// counted just now, still on its way).
    pub fn queue_empty(&self) {
        let queued = self.loads.queued_on(self.index);
        // Read first: a store would take the cache line from the CPUs that read it.
        if queued.load(Ordering::Relaxed) != 0 {
            queued.store(0, Ordering::Relaxed);
        }
    }
}

/// An open connection, counted on its worker.
pub struct Open(Arc<Worker>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0
            .loads
            .counter(self.0.index)
            .fetch_sub(1, Ordering::Relaxed);
    }
}
