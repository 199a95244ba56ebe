//! The L7 workers' connection balancer: an `SK_REUSEPORT` program (`lb-reuseport` object) that
//! gives each new connection of a listener to the less loaded of two of its workers' sockets,
//! and the load figures the workers keep for it.

/// The program's name in the object.
pub const PROG_PICK_WORKER: &str = "lb_pick_worker";
/// `REUSEPORT_SOCKARRAY`: worker index → that worker's listening socket.
pub const WORKER_SOCKETS: &str = "WORKER_SOCKETS";
/// `ARRAY` of [`WorkerLoad`], memory-mapped by the agent (`BPF_F_MMAPABLE`): worker index →
/// its open and queued connections.
pub const WORKER_LOAD: &str = "WORKER_LOAD";
/// The global the agent sets at load: how many workers the listener has.
pub const WORKERS_GLOBAL: &str = "WORKERS";
/// Most workers a listener may have (more CPUs than this share the sockets by hash).
pub const MAX_WORKERS: u32 = 256;

/// One worker's load. A cache line of its own: each worker writes its own at every accept and
/// close, and would otherwise take the line from the other workers each time.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct WorkerLoad {
    /// Open client connections (the agent's atomic; the program only reads it).
    pub connections: u64,
    /// Connections given to the worker and not yet accepted: the program adds one per pick
    /// (atomically), the worker takes one per accept and clears it when its queue is found
    /// empty. A worker that is not running (its CPU taken) cannot accept, and this is what
    /// shows it.
    pub queued: u64,
    pub _pad: [u64; 6],
}
const _: () = assert!(core::mem::size_of::<WorkerLoad>() == 64);
