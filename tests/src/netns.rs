//! A named network namespace (`ip netns add`), deleted on drop.

use std::{
    fs::File,
    os::fd::AsFd,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sched::{setns, CloneFlags};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `lbt-<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "lbt-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ARGS`, panicking with its stderr on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `args` inside the namespace and returns its output (not checked).
    pub fn output(&self, args: &[&str]) -> Output {
        self.command(args[0])
            .args(&args[1..])
            .output()
            .expect("spawn ip netns exec")
    }

    /// Runs `args` inside the namespace, panicking on failure.
    pub fn run(&self, args: &[&str]) {
        check(&self.name, args, self.output(args));
    }

    /// Writes a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Spawns `args` inside the namespace with stdout/stderr discarded.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args[0])
            .args(&args[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in netns")
    }

    /// Kills (SIGKILL) every process in the namespace but this one, as a crashed host would
    /// lose them; returns how many.
    pub fn kill_all(&self) -> usize {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .expect("spawn ip netns pids");
        let me = std::process::id();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .filter(|&p| p != me)
            .filter(|&p| {
                let pid = nix::unistd::Pid::from_raw(p as i32);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok()
            })
            .count()
    }

    /// Moves the calling thread into the namespace until the guard drops. Sockets created
    /// meanwhile belong to it. Use on a thread of its own (the guard is not `Send`).
    pub fn enter(&self) -> Entered {
        enter(&self.name)
    }

    /// Runs `f` on a new thread inside the namespace and returns its result.
    pub fn scoped<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let _in = self.enter();
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Whatever still runs in it would outlive it: nginx workers whose master was killed,
        // socat's per-connection children.
        self.kill_all();
        // Deleting the namespace removes its interfaces (and their veth peers elsewhere).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Child processes (servers a test started in its namespaces), killed and reaped on drop.
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Moves the calling thread into the namespace called `name` until the guard drops.
pub fn enter(name: &str) -> Entered {
    let back = File::open("/proc/thread-self/ns/net").expect("open own netns");
    let target = File::open(format!("/var/run/netns/{name}")).expect("open netns");
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
    Entered {
        back,
        _not_send: std::marker::PhantomData,
    }
}

/// Restores the thread's previous namespace on drop.
pub struct Entered {
    back: File,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = setns(self.back.as_fd(), CloneFlags::CLONE_NEWNET);
    }
}

/// Runs a host command, panicking with its stderr on failure.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    check("host", args, out);
}

fn check(ns: &str, args: &[&str], out: Output) {
    assert!(
        out.status.success(),
        "[{ns}] `{}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
