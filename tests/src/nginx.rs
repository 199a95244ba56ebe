//! nginx answering `ok` on every path: the backend of the L7 abuse test and of the benchmarks.

use std::{path::Path, process::Child};

use crate::Netns;

/// Starts nginx in `ns`, listening on `listen` (`port` or `address:port`) with `workers` worker
/// processes; its config, pid file and error log are `name.*` in `dir`.
pub fn ok_server(ns: &Netns, dir: &Path, name: &str, listen: &str, workers: u32) -> Child {
    let d = dir.display();
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "daemon off; worker_processes {workers}; pid {d}/{name}.pid; error_log {d}/{name}.err;
events {{ worker_connections 16384; }}
http {{ access_log off; server {{ listen {listen} backlog=4096; location / {{ return 200 \"ok\\n\"; }} }} }}
"
        ),
    )
    .expect("write the nginx config");
    ns.spawn(&[
        "nginx",
        "-p",
        &d.to_string(),
        "-c",
        &conf.display().to_string(),
    ])
}
