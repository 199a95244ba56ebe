//! Where a running dataplane's state lives between agent processes, so a restarted or upgraded
//! agent adopts it (hitless restart) and `lb-agent stop --detach` can remove it.
//!
//! - BPF pins (maps and XDP links) go in a bpffs the agent mounts itself at
//!   `{state_dir}/bpf`, one directory per network namespace (`netns-{cookie}`: one agent per
//!   namespace, since XDP attaches to that namespace's interfaces).
//! - Plain files (pid, config path, VIP addresses the agent added) go in
//!   `{state_dir}/netns-{cookie}/`.
//!
//! `ip netns exec` runs its command in a private mount namespace that dies with it, so a bpffs
//! mounted there would take the pins along when the agent exits. When the agent finds itself in
//! a mount namespace other than its parent's, it mounts the bpffs in the first ancestor's
//! namespace that differs (the host's, for `ip netns exec`) and reaches it through
//! `/proc/self/fd`, which keeps working after that ancestor exits.

use std::{
    fs,
    io::ErrorKind,
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use nix::{
    fcntl::{open, OFlag},
    sched::{setns, CloneFlags},
    sys::{
        signal::kill,
        stat::Mode,
        statfs::{statfs, BPF_FS_MAGIC},
    },
    unistd::Pid,
};
use tracing::info;

/// Where state lives unless `agent.state_dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/lb-agent";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting a bpffs at {path}: {detail}")]
    Mount { path: PathBuf, detail: String },
    #[error("reading this network namespace's cookie: {0}")]
    Cookie(std::io::Error),
    #[error("another lb-agent (pid {0}) runs in this network namespace")]
    Running(i32),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// This network namespace's state: its pin directory and its file directory.
#[derive(Debug)]
pub struct State {
    pins: PathBuf,
    files: PathBuf,
    /// Keeps a bpffs of another mount namespace reachable (`pins` goes through it).
    _bpffs: Option<OwnedFd>,
}

impl State {
    /// Opens (creating and mounting what is missing) the state of this network namespace and
    /// records this process as its agent running `config`; fails while another one is alive.
    pub fn open(state_dir: &Path, config: &Path) -> Result<Self, StateError> {
        let ns = namespace_dir()?;
        let files = state_dir.join(&ns);
        fs::create_dir_all(&files).map_err(io_err(&files))?;
        // The pid goes first: another agent removing dead namespaces' state skips a pin
        // directory whose agent lives.
        Self::files_only(files.clone()).claim(config)?;
        let mount_point = state_dir.join("bpf");
        // Agents starting together (in other namespaces) would each mount a bpffs over the
        // other's and lose track of their pins: one checks and mounts at a time.
        let lock_path = state_dir.join(".mount.lock");
        let lock = fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
        let _locked = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err(&lock_path)(e.into()))?;
        let (bpffs, held) = bpffs(&mount_point)?;
        let pins = bpffs.join(&ns);
        fs::create_dir_all(&pins).map_err(io_err(&pins))?;
        Ok(Self {
            pins,
            files,
            _bpffs: held,
        })
    }

    /// The state of this network namespace if an agent left some; mounts nothing.
    pub fn find(state_dir: &Path) -> Result<Option<Self>, StateError> {
        let ns = namespace_dir()?;
        let files = state_dir.join(&ns);
        let mount_point = state_dir.join("bpf");
        let (bpffs, held) = match outer(&mount_point) {
            Some((_, path)) if is_bpffs(&path) => {
                let (path, fd) = hold(&path)?;
                (path, Some(fd))
            }
            _ if is_bpffs(&mount_point) => (mount_point, None),
            _ => return Ok(files.is_dir().then(|| Self::files_only(files))),
        };
        let pins = bpffs.join(&ns);
        if !pins.is_dir() && !files.is_dir() {
            return Ok(None);
        }
        Ok(Some(Self {
            pins,
            files,
            _bpffs: held,
        }))
    }

    fn files_only(files: PathBuf) -> Self {
        Self {
            pins: PathBuf::new(),
            files,
            _bpffs: None,
        }
    }

    /// The states other network namespaces' agents left next to this one.
    pub fn others(&self) -> Vec<State> {
        let (Some(root), Some(own)) = (self.pins.parent(), self.pins.file_name()) else {
            return Vec::new();
        };
        let files_root = self
            .files
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        fs::read_dir(root)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|n| n != own && n.to_string_lossy().starts_with("netns-"))
            .map(|n| State {
                pins: root.join(&n),
                files: files_root.join(&n),
                _bpffs: None,
            })
            .collect()
    }

    /// The directory maps and links are pinned in.
    pub fn pins(&self) -> &Path {
        &self.pins
    }

    fn claim(&self, config: &Path) -> Result<(), StateError> {
        if let Some(pid) = self.agent_pid() {
            if pid != std::process::id() as i32 {
                return Err(StateError::Running(pid));
            }
        }
        // Reload results count from this agent's first reload.
        let _ = fs::remove_file(self.files.join("reload"));
        self.write("pid", &format!("{}\n", std::process::id()))?;
        let config = fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
        self.write("config", &format!("{}\n", config.display()))
    }

    /// The pid of a live agent of this namespace.
    pub fn agent_pid(&self) -> Option<i32> {
        let pid: i32 = self.read("pid")?.trim().parse().ok()?;
        // Signal 0: only asks whether the process exists.
        kill(Pid::from_raw(pid), None).ok()?;
        // An agent that exited but was not reaped (its parent died) is not running.
        (proc_stat(pid, 0)? != "Z").then_some(pid)
    }

    /// The config file the last agent of this namespace ran with.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.read("config").map(|s| PathBuf::from(s.trim()))
    }

    /// Addresses an agent added to interfaces (as `cidr dev` pairs), to remove on detach.
    pub fn added_addresses(&self) -> Vec<(String, String)> {
        self.read("addresses")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(a, d)| (a.to_string(), d.to_string()))
            .collect()
    }

    pub fn set_added_addresses(&self, added: &[(String, String)]) -> Result<(), StateError> {
        let text: String = added.iter().map(|(a, d)| format!("{a} {d}\n")).collect();
        self.write("addresses", &text)
    }

    /// The SNAT port range an agent reserved on the host (`MIN-MAX`), to release on detach.
    pub fn reserved_ports(&self) -> Option<String> {
        self.read("reserved_ports")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    pub fn set_reserved_ports(&self, range: Option<&str>) -> Result<(), StateError> {
        self.write("reserved_ports", range.unwrap_or_default())
    }

    /// Records the outcome of the agent's `generation`th reload: `ok` or `error: …`.
    pub fn set_reload(&self, generation: u64, report: &str) -> Result<(), StateError> {
        self.write("reload", &format!("{generation} {report}"))
    }

    /// The ids the running dataplane's listeners and backends have (see [`crate::plan::Ids`]);
    /// none when the state predates them or was never written.
    pub fn ids(&self) -> Option<crate::plan::Ids> {
        serde_json::from_str(&self.read("ids")?).ok()
    }

    pub fn set_ids(&self, ids: &crate::plan::Ids) -> Result<(), StateError> {
        let text = serde_json::to_string(ids).unwrap_or_default();
        self.write("ids", &text)
    }

    /// The probed backends that were up (see [`crate::health::Health::up_members`]).
    pub fn up_backends(&self) -> Option<Vec<(String, std::net::SocketAddr)>> {
        serde_json::from_str(&self.read("up")?).ok()
    }

    pub fn set_up_backends(&self, up: &[(String, std::net::SocketAddr)]) -> Result<(), StateError> {
        let text = serde_json::to_string(up).unwrap_or_default();
        self.write("up", &text)
    }

    /// The last reload's generation and outcome.
    pub fn reload_result(&self) -> Option<(u64, String)> {
        let text = self.read("reload")?;
        let (g, report) = text.split_once(' ')?;
        Some((g.parse().ok()?, report.to_string()))
    }

    /// Forgets the agent's pid (it exits; the dataplane stays).
    pub fn release(&self) {
        let _ = fs::remove_file(self.files.join("pid"));
    }

    /// Removes the pin directory (whatever is pinned must be unpinned first) and the files.
    pub fn remove(self) -> Result<(), StateError> {
        if !self.pins.as_os_str().is_empty() {
            match fs::remove_dir(&self.pins) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(io_err(&self.pins)(e)),
                _ => {}
            }
        }
        match fs::remove_dir_all(&self.files) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err(&self.files)(e)),
            _ => Ok(()),
        }
    }

    fn read(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.files.join(name)).ok()
    }

    fn write(&self, name: &str, text: &str) -> Result<(), StateError> {
        let path = self.files.join(name);
        let tmp = self.files.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }
}

/// `netns-{cookie}`: the cookie is unique per namespace for the whole boot (inode numbers are
/// reused), so a new namespace never adopts a dead one's pins.
fn namespace_dir() -> Result<String, StateError> {
    let sock = std::net::UdpSocket::bind((IpAddr::from([127, 0, 0, 1]), 0))
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(StateError::Cookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of the option's size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(StateError::Cookie(std::io::Error::last_os_error()));
    }
    Ok(format!("netns-{cookie}"))
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// The mount namespace of `pid`, as the kernel names it (`mnt:[…]`).
fn mount_ns(pid: &str) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

/// The nearest ancestor in another mount namespace than this process, if any is readable.
fn outer_ancestor() -> Option<i32> {
    let own = mount_ns("self")?;
    let mut pid = std::os::unix::process::parent_id() as i32;
    while pid > 1 {
        let ns = mount_ns(&pid.to_string())?;
        if ns != own {
            return Some(pid);
        }
        pid = proc_stat(pid, 1)?.parse().ok()?;
    }
    None
}

/// Field `n` after the command name of `/proc/PID/stat` (0: state, 1: parent pid). The name
/// is parenthesised and may hold spaces and parentheses, so fields count from its last `)`.
fn proc_stat(pid: i32, n: usize) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(n)?
            .to_string(),
    )
}

/// `mount_point` as the nearest ancestor in another mount namespace sees it (with that
/// ancestor's pid), or `None` when this process is in the outermost namespace it can see.
fn outer(mount_point: &Path) -> Option<(i32, PathBuf)> {
    let pid = outer_ancestor()?;
    let path = PathBuf::from(format!("/proc/{pid}/root"))
        .join(mount_point.strip_prefix("/").unwrap_or(mount_point));
    Some((pid, path))
}

/// A path to the directory `path` that keeps working after the process it goes through
/// (`/proc/PID/root`) exits: through an fd of ours, which the caller keeps.
fn hold(path: &Path) -> Result<(PathBuf, OwnedFd), StateError> {
    let fd = open(path, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
        .map_err(|e| io_err(path)(e.into()))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    Ok((
        PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
        fd,
    ))
}

/// A bpffs at `mount_point` (mounted now if needed) in the outermost mount namespace
/// reachable; the path to use for it, and the fd that keeps it reachable if any.
fn bpffs(mount_point: &Path) -> Result<(PathBuf, Option<OwnedFd>), StateError> {
    let Some((pid, outer)) = outer(mount_point) else {
        if !is_bpffs(mount_point) {
            fs::create_dir_all(mount_point).map_err(io_err(mount_point))?;
            nix::mount::mount(
                Some("bpf"),
                mount_point,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| StateError::Mount {
                path: mount_point.into(),
                detail: e.to_string(),
            })?;
            info!(path = %mount_point.display(), "bpffs mounted");
        }
        return Ok((mount_point.to_path_buf(), None));
    };
    if !is_bpffs(&outer) {
        fs::create_dir_all(&outer).map_err(io_err(&outer))?;
        mount_in(pid, mount_point)?;
        info!(path = %mount_point.display(), pid, "bpffs mounted in the mount namespace of an ancestor (this one is private)");
    }
    if !is_bpffs(&outer) {
        return Err(StateError::Mount {
            path: outer,
            detail: "not a bpffs after mounting".into(),
        });
    }
    let (path, fd) = hold(&outer)?;
    Ok((path, Some(fd)))
}

/// Runs `mount -t bpf` inside the mount namespace of `pid`.
fn mount_in(pid: i32, mount_point: &Path) -> Result<(), StateError> {
    let ns_path = PathBuf::from(format!("/proc/{pid}/ns/mnt"));
    let ns: OwnedFd = fs::File::open(&ns_path).map_err(io_err(&ns_path))?.into();
    let mount_err = |detail: String| StateError::Mount {
        path: mount_point.into(),
        detail,
    };
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "bpf", "bpf"]).arg(mount_point);
    // SAFETY: setns is async-signal-safe; the fd was opened before the fork.
    unsafe {
        cmd.pre_exec(move || setns(&ns, CloneFlags::CLONE_NEWNS).map_err(std::io::Error::from));
    }
    let out = cmd.output().map_err(|e| mount_err(e.to_string()))?;
    if !out.status.success() {
        return Err(mount_err(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}
