//! `lb-agent run | check | reload | stop | status | stats | diagnose`: the command line.
//! Everything else lives in the library.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use lb_agent::{
    admin, cli,
    config::{self, Config},
    dataplane::{self, Dataplane},
    gc,
    health::Health,
    netif, overrides, plan,
    plan::Plan,
    proxy::{self, metrics::RequestStats},
    state::{State, DEFAULT_STATE_DIR},
    stats,
};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

#[global_allocator]
static ALLOC: lb_agent::alloc::MiMalloc = lb_agent::alloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "XDP L4 FullNAT load balancer agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the XDP program, fill its maps from the config and keep them up to date until
    /// SIGINT/SIGTERM. The dataplane is pinned and keeps forwarding after the agent exits; the
    /// next `run` adopts it (established flows survive), `stop --detach` removes it.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Start from empty maps (unpins what an earlier agent left, dropping its flows).
        #[arg(long)]
        fresh: bool,
    },
    /// Validate a config file (syntax, fields, cross-references, addresses of this host).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Make the agent of this network namespace re-read its config file (as SIGHUP does):
    /// an invalid file is reported here with its file:line:column and changes nothing.
    Reload {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Stop the agent of this network namespace. The dataplane keeps forwarding unless
    /// `--detach` is given, which also detaches the program, removes its pinned maps and the
    /// VIP addresses the agent added.
    Stop {
        #[arg(long)]
        detach: bool,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Show the running agent's listeners, pools and backends: health, weight, active flows.
    Status {
        #[command(flatten)]
        api: Api,
    },
    /// Show the running agent's counters: packets by verdict (drops by reason), traffic per
    /// listener and per backend, conntrack and SNAT port use.
    Stats {
        #[command(flatten)]
        api: Api,
    },
    /// Check why clients cannot reach a listener or get 5xx: listener, VIP, XDP attachment,
    /// interface settings, route and ACL for a client, backends (health and a live check from
    /// the LB), SNAT and conntrack pressure, drops, recent 5xx in access logs. One line per
    /// finding with a fix; exits 1 when something is wrong.
    Diagnose {
        #[command(flatten)]
        api: Api,
        /// A client address: checks the route back to it and the listeners' ACL verdict.
        #[arg(long)]
        client: Option<IpAddr>,
        /// Only this listener and its pools (default: all).
        #[arg(long)]
        listener: Option<String>,
    },
}

/// How the commands find the running agent.
#[derive(Args)]
struct Api {
    /// The admin API (default: `agent.admin` of --config, else 127.0.0.1:9100).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// The agent's config file: where its admin API listens (and, for diagnose, what to check;
    /// by default the file the running agent reports).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not for journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => config::load(&config)
            .map(|_| {
                println!("{}: ok", config.display());
            })
            .map_err(anyhow::Error::from),
        Command::Run { config, fresh } => run(config, fresh),
        Command::Reload { state_dir } => reload(&state_dir),
        Command::Stop { detach, state_dir } => stop(&state_dir, detach),
        Command::Status { api } => show(&api, cli::status_table),
        Command::Stats { api } => show(&api, cli::stats_table),
        Command::Diagnose {
            api,
            client,
            listener,
        } => return diagnose(api, client, listener),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Config errors are one line already (file:line:column: path: message).
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The CLI commands talk to the API on a small runtime of their own.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

/// Prints the running agent's status through `render`.
fn show(api: &Api, render: fn(&admin::status::Status) -> String) -> anyhow::Result<()> {
    let addr = cli::admin_address(api.admin, api.config.as_deref())?;
    // The message already names the cause; as an anyhow chain it would repeat it.
    let status = block_on(admin::client::status(addr))?.map_err(|e| anyhow::anyhow!("{e}"))?;
    print!("{}", render(&status));
    Ok(())
}

fn diagnose(api: Api, client: Option<IpAddr>, listener: Option<String>) -> ExitCode {
    let admin = match cli::admin_address(api.admin, api.config.as_deref()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = cli::diagnose::Options {
        admin,
        config: api.config,
        client,
        listener,
    };
    let findings = match block_on(cli::diagnose::run(&options)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    for f in &findings {
        println!("{f}");
    }
    let failed = findings
        .iter()
        .filter(|f| f.level == cli::diagnose::Level::Fail)
        .count();
    if failed == 0 {
        println!("no problem found");
        ExitCode::SUCCESS
    } else {
        println!("{failed} problem(s) found");
        ExitCode::FAILURE
    }
}

/// How long in-flight L7 requests get to finish after SIGTERM or a reload that replaces
/// their listener.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The agent's running state: what the config became in the kernel and on the host.
struct Agent {
    path: PathBuf,
    cfg: Config,
    state: State,
    dp: Dataplane,
    health: Arc<Health>,
    /// The ids the maps index listeners and backends by, kept across reloads and restarts.
    ids: plan::Ids,
    plan: Plan,
    /// VIP addresses agents added to interfaces.
    added: Vec<netif::Added>,
    /// The probe tasks of `health` (dropping them stops the probes).
    checks: JoinSet<()>,
    /// The L7 listeners' servers (config order); dropping one's entry stops them, and they
    /// finish their connections in the background.
    proxies: Vec<proxy::Started>,
    l7_done: JoinSet<()>,
    /// Reloads so far, reported to `lb-agent reload`.
    generation: u64,
    /// The last conntrack sweep's findings.
    swept: gc::Report,
    /// Weight and drain changes from the admin API; cleared when the config is reloaded.
    overrides: overrides::Overrides,
    /// Publishes views to the admin API (set once it serves).
    publisher: Option<admin::Publisher>,
    admin: Option<admin::Api>,
}

fn run(path: PathBuf, fresh: bool) -> anyhow::Result<()> {
    let cfg = config::load(&path)?;
    let state = State::open(&cfg.agent.state_dir, &path).context("opening the state directory")?;
    remove_dead_states(&state);
    let dp = Dataplane::open(state.pins(), fresh).context("loading the XDP program")?;
    let health = Arc::new(Health::new(&cfg));
    // Probed backends start offline (a new backend is online after its first success),
    // except those an adopted dataplane was serving.
    if let Some(up) = (!fresh).then(|| state.up_backends()).flatten() {
        health.resume(&up);
    }
    let overrides = overrides::Overrides::default();
    // An adopted dataplane's flows and counters carry its ids; a fresh one starts at zero.
    let previous = if fresh { None } else { state.ids() }.unwrap_or_default();
    let ids = plan::Ids::assign(&cfg, &previous);
    let plan = plan::build_with(&cfg, &ids, &overrides, |p, b| health.is_up(p, b));
    let added = state.added_addresses();
    let mut agent = Agent {
        path,
        cfg: cfg.clone(),
        state,
        dp,
        health,
        ids,
        plan,
        added,
        checks: JoinSet::new(),
        proxies: Vec::new(),
        l7_done: JoinSet::new(),
        generation: 0,
        swept: gc::Report::default(),
        overrides,
        publisher: None,
        admin: None,
    };
    agent.dp.apply(&agent.plan).context("filling the maps")?;
    agent.ids_applied(&previous);
    agent.prepare_host(None)?;

    // Multi-threaded for the L7 proxy (one worker per core); the L4 path needs no runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(agent.serve());
    agent.state.release();
    let exit = result?;
    match agent.dp.snapshot(agent.plan.listener_slots()) {
        Ok(s) => print!(
            "{}{}",
            stats::render(&s, &agent.plan, &agent.swept.active),
            stats::render_health(&agent.health)
        ),
        Err(e) => error!(error = %e, "reading counters"),
    }
    match exit {
        Exit::Keep => {
            info!("exiting; the dataplane keeps forwarding (`lb-agent stop --detach` removes it)")
        }
        Exit::Detach => {
            let Agent { state, dp, .. } = agent;
            detach(state)?;
            // The program's last link references go with it.
            drop(dp);
            info!("exiting; dataplane detached and removed");
        }
    }
    Ok(())
}

/// How the agent leaves: SIGTERM (a service manager's stop or restart) keeps the dataplane
/// forwarding for the next agent; SIGINT (Ctrl-C at a terminal) removes it, as
/// `lb-agent stop --detach` does.
enum Exit {
    Keep,
    Detach,
}

impl Agent {
    /// Interfaces, sysctls, reserved ports, VIP addresses and XDP attachments for `self.cfg`,
    /// undoing what `old` had and `self.cfg` no longer has.
    fn prepare_host(&mut self, old: Option<&Config>) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        for iface in &cfg.agent.interfaces {
            netif::prepare_interface(iface).with_context(|| format!("preparing {iface}"))?;
        }
        if cfg.listeners.iter().any(|l| l.vip.is_ipv6()) {
            netif::enable_ipv6_forwarding()?;
        }
        let wanted = cfg.snat.as_ref().map(|s| s.ports.to_string());
        let reserved = self.state.reserved_ports();
        if reserved != wanted {
            if let Some(range) = &reserved {
                netif::unreserve_ports(range).context("releasing the old SNAT port range")?;
            }
            self.state.set_reserved_ports(wanted.as_deref())?;
        }
        if let Some(snat) = &cfg.snat {
            netif::reserve_ports(snat.ports).context("reserving the SNAT port range")?;
        }
        let local = config::Host::current()?.addresses.unwrap_or_default();
        let vips: Vec<_> = cfg.listeners.iter().map(|l| l.vip).collect();
        self.added =
            netif::sync_vip_addresses(&vips, &local, &cfg.agent.interfaces[0], &self.added)?;
        self.state.set_added_addresses(&self.added)?;
        let mut had = old.map_or(&[][..], |o| &o.agent.interfaces[..]);
        if old.is_some_and(|o| o.agent.xdp_mode != cfg.agent.xdp_mode) {
            // A link keeps its mode: a new mode means new links (a moment without the program).
            warn!(mode = ?cfg.agent.xdp_mode, "xdp_mode changed: attaching anew");
            self.dp.detach_others(&[])?;
            had = &[];
        }
        for iface in &cfg.agent.interfaces {
            if !had.contains(iface) {
                self.dp.attach(iface, cfg.agent.xdp_mode)?;
            }
        }
        self.dp.detach_others(&cfg.agent.interfaces)?;
        Ok(())
    }

    /// Probes, L7 proxies, signals, the conntrack sweep and reloads, until SIGTERM/SIGINT.
    async fn serve(&mut self) -> anyhow::Result<Exit> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        self.start_proxies().await?;
        self.checks = self.health.start(&self.cfg);
        // The admin API shows the views published here and sends back weight and drain changes.
        let (publisher, views) =
            admin::Publisher::new(&self.path, self.health.clone(), self.requests());
        let (changes, mut commands) = tokio::sync::mpsc::channel(16);
        self.admin = Some(admin::Api::serve(self.cfg.agent.admin, views, changes).await?);
        self.publisher = Some(publisher);
        self.publish();
        info!(config = %self.path.display(), listeners = self.cfg.listeners.len(), backends = self.plan.backends.len(), "running");
        let mut sweep = tokio::time::interval(gc::INTERVAL);
        // A sweep of a full table takes a good part of a second: the next one waits its
        // interval instead of following at once, so the agent never sweeps non-stop.
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut modified = mtime(&self.path);
        let exit = loop {
            tokio::select! {
                // Signals first: with the sweep always ready, a random pick could leave SIGTERM
                // waiting for several sweeps.
                biased;
                _ = term.recv() => { info!("SIGTERM"); break Exit::Keep; }
                _ = int.recv() => { info!("SIGINT"); break Exit::Detach; }
                _ = hup.recv() => { info!("SIGHUP: reloading"); self.reload().await; }
                _ = usr1.recv() => print!("{}", stats::render_health(&self.health)),
                // L7 pools read the health directly; the L4 tables are rebuilt and swapped in.
                // Status shows the change at once, not at the next sweep.
                _ = self.health.changed() => {
                    self.apply_health();
                    self.publish();
                }
                Some(c) = commands.recv() => {
                    let result = self.overrides.set(&self.cfg, &c.pool, c.backend, c.change);
                    if result.is_ok() {
                        info!(pool = %c.pool, backend = %c.backend, change = ?c.change, "admin change");
                        self.overrides.apply_to(&self.health);
                        self.apply_health();
                        self.publish();
                    }
                    c.reply(result);
                }
                // A sweep is blocking map syscalls: keep it off the proxy's workers' queue.
                _ = sweep.tick() => {
                    let (dp, plan) = (&mut self.dp, &self.plan);
                    let swept = tokio::task::block_in_place(|| {
                        let r = dp.gc(plan, gc::monotonic_ns());
                        lb_agent::alloc::release_freed_memory();
                        r
                    });
                    match swept {
                        Ok(r) => {
                            if r.expired > 0 {
                                debug!(expired = r.expired, entries = r.entries, "conntrack sweep");
                            }
                            if r.resets > 0 {
                                info!(resets = r.resets, "idle TCP flows reset at both ends");
                            }
                            self.swept = r;
                        }
                        Err(e) => warn!(error = %e, "conntrack sweep failed"),
                    }
                    self.publish();
                    if self.cfg.agent.watch_config {
                        let now = mtime(&self.path);
                        if now != modified {
                            modified = now;
                            info!("config file changed: reloading");
                            self.reload().await;
                        }
                    }
                }
            }
        };
        self.proxies.clear();
        while self.l7_done.join_next().await.is_some() {}
        // Their access logs' last lines.
        tokio::task::block_in_place(|| proxy::log::finish_writers(Duration::from_secs(2)));
        Ok(exit)
    }

    /// After the maps took `self.ids`: counters of ids `previous` did not give the same
    /// listener or backend start from zero, and the ids are kept for the next agent. Without
    /// a previous assignment (a new dataplane, or one an agent that kept none ran, in config
    /// order as here) the counters stay.
    fn ids_applied(&mut self, previous: &plan::Ids) {
        if *previous != plan::Ids::default() {
            let (listeners, backends) = self.ids.fresh(previous);
            if let Err(e) = self.dp.clear_counters(&listeners, &backends) {
                warn!(error = %e, "clearing the counters of new listeners and backends");
            }
        }
        if let Err(e) = self.state.set_ids(&self.ids) {
            warn!(error = %e, "recording the listener and backend ids");
        }
    }

    /// Records which probed backends are up, for a restarted agent to resume from.
    fn save_health(&self) {
        if let Err(e) = self.state.set_up_backends(&self.health.up_members()) {
            warn!(error = %e, "recording which backends are up");
        }
    }

    fn apply_health(&mut self) {
        self.save_health();
        // One snapshot for the tables and the log line: probes keep changing it.
        let up = self.health.snapshot();
        self.plan = plan::build_with(&self.cfg, &self.ids, &self.overrides, |p, b| up.is_up(p, b));
        let (dp, plan) = (&mut self.dp, &self.plan);
        match tokio::task::block_in_place(|| dp.apply(plan)) {
            Ok(()) => info!(
                healthy = up.healthy(),
                backends = self.plan.backends.len(),
                down = %up.down(&self.cfg, 10),
                "backend tables updated"
            ),
            Err(e) => error!(error = %e, "updating the backend tables"),
        }
    }

    /// A fresh view for the admin API (blocking map reads).
    fn publish(&self) {
        if let Some(p) = &self.publisher {
            tokio::task::block_in_place(|| {
                p.publish(
                    &self.dp,
                    &self.cfg,
                    &self.plan,
                    &self.overrides,
                    &self.swept,
                )
            });
        }
    }

    /// The L7 listeners' request counters (config order).
    fn requests(&self) -> Vec<Arc<RequestStats>> {
        self.proxies.iter().map(|p| p.requests.clone()).collect()
    }

    /// Starts servers for the L7 listeners of `self.cfg` that are new or changed, next to the
    /// ones running (SO_REUSEPORT), then tells the replaced and removed ones to stop accepting
    /// and finish their connections. An unchanged listener keeps its servers and connections
    /// (only the difference is applied), and a replaced one its request counters.
    async fn start_proxies(&mut self) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let bases: Vec<(&config::Listener, proxy::Basis)> = cfg
            .listeners
            .iter()
            .filter(|l| l.protocol.is_l7())
            .map(|l| (l, proxy::Basis::of(cfg, l)))
            .collect();
        let (kept, replaced): (Vec<_>, Vec<_>) = std::mem::take(&mut self.proxies)
            .into_iter()
            .partition(|p| bases.iter().any(|(_, b)| *b == p.basis));
        let wanted: Vec<&config::Listener> = bases
            .iter()
            .filter(|(_, b)| !kept.iter().any(|p| p.basis == *b))
            .map(|(l, _)| *l)
            .collect();
        let mut started = Vec::new();
        if !wanted.is_empty() {
            let carried: Vec<_> = replaced.iter().map(|p| p.requests.clone()).collect();
            match proxy::start(cfg, &wanted, &self.health, &carried, SHUTDOWN_GRACE).await {
                Ok((s, done)) => {
                    self.l7_done.spawn(done);
                    started = s;
                }
                Err(e) => {
                    self.proxies = kept.into_iter().chain(replaced).collect();
                    return Err(e).context("starting the L7 proxy");
                }
            }
            info!(listeners = ?wanted.iter().map(|l| &l.name).collect::<Vec<_>>(), "L7 listeners started");
        }
        let mut proxies: Vec<_> = kept.into_iter().chain(started).collect();
        proxies.sort_by_key(|p| bases.iter().position(|(_, b)| *b == p.basis));
        self.proxies = proxies;
        // Their senders go: they stop accepting and drain.
        drop(replaced);
        // Earlier generations' threads that have ended.
        while self.l7_done.try_join_next().is_some() {}
        Ok(())
    }

    /// Re-reads the config file and applies what changed; an invalid file changes nothing.
    async fn reload(&mut self) {
        self.generation += 1;
        let result = match config::load(&self.path) {
            // Certificate files are watched by the proxy itself.
            Ok(cfg) if cfg == self.cfg => {
                info!("config unchanged");
                Ok("unchanged")
            }
            Ok(cfg) => self.apply_config(cfg).await.map(|()| "ok"),
            Err(e) => Err(anyhow::Error::from(e)),
        };
        let report = match &result {
            Ok(outcome) => outcome.to_string(),
            Err(e) => {
                let e = chain(e);
                error!("reload failed, still running the previous config: {e}");
                format!("error: {e}")
            }
        };
        if let Err(e) = self.state.set_reload(self.generation, &report) {
            warn!(error = %e, "recording the reload result");
        }
    }

    async fn apply_config(&mut self, cfg: Config) -> anyhow::Result<()> {
        if cfg.agent.state_dir != self.cfg.agent.state_dir {
            bail!("agent.state_dir cannot change while the agent runs (restart it)");
        }
        // Moved first: a new address that cannot be bound fails the reload before anything
        // changed.
        if let Some(api) = &mut self.admin {
            api.move_to(cfg.agent.admin).await?;
        }
        let old = std::mem::replace(&mut self.cfg, cfg);
        // The new file is the truth again: run-time weight and drain changes end here (they
        // stay with the old config if the maps refuse the new one).
        let kept = self.overrides.clone();
        self.overrides.clear();
        let health = Arc::new(Health::carrying(&self.cfg, Some(&self.health)));
        self.overrides.apply_to(&health);
        let up = health.snapshot();
        let ids = plan::Ids::assign(&self.cfg, &self.ids);
        let plan = plan::build_with(&self.cfg, &ids, &self.overrides, |p, b| up.is_up(p, b));
        // The maps first: a bad interface or address below leaves the tables right anyway.
        let (dp, new_plan) = (&mut self.dp, &plan);
        if let Err(e) = tokio::task::block_in_place(|| dp.apply(new_plan)) {
            if let Some(api) = &mut self.admin {
                if let Err(e) = api.move_to(old.agent.admin).await {
                    warn!(error = %e, "the admin API stays on the refused config's address");
                }
            }
            self.cfg = old;
            self.overrides = kept;
            // Members carried into the refused health are the running ones.
            self.overrides.apply_to(&self.health);
            let (dp, plan) = (&mut self.dp, &self.plan);
            let _ = tokio::task::block_in_place(|| dp.apply(plan));
            return Err(e).context("updating the maps");
        }
        self.plan = plan;
        let previous = std::mem::replace(&mut self.ids, ids);
        self.ids_applied(&previous);
        self.health = health;
        self.save_health();
        self.checks = self.health.start(&self.cfg);
        tokio::task::block_in_place(|| self.prepare_host(Some(&old)))?;
        self.start_proxies().await?;
        let requests = self.requests();
        if let Some(p) = &mut self.publisher {
            p.follow(self.health.clone(), requests);
        }
        self.publish();
        info!(
            listeners = self.cfg.listeners.len(),
            backends = self.plan.backends.len(),
            "config reloaded"
        );
        Ok(())
    }
}

/// `e` and its causes on one line, as `{:#}` writes them, without a cause the message before
/// already ends with (this crate's errors name their source in their own message).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Pins of network namespaces that were deleted without `lb-agent stop --detach` hold their
/// program and maps (hundreds of MB with a full-size conntrack table) until removed: no agent
/// runs there and no link has an interface any more.
fn remove_dead_states(own: &State) {
    for other in own.others() {
        if other.agent_pid().is_some() || dataplane::attached(other.pins()) {
            continue;
        }
        let pins = other.pins().display().to_string();
        match dataplane::remove_pins(other.pins())
            .map_err(anyhow::Error::from)
            .and_then(|()| other.remove().map_err(anyhow::Error::from))
        {
            Ok(()) => info!(pins, "removed the state of a deleted network namespace"),
            Err(e) => warn!(pins, error = %e, "removing a deleted namespace's state"),
        }
    }
}

/// The state of this namespace's agent, or a message saying there is none.
fn find_state(state_dir: &Path) -> anyhow::Result<State> {
    State::find(state_dir)?.with_context(|| {
        format!(
            "no lb-agent state in {} for this network namespace",
            state_dir.display()
        )
    })
}

fn reload(state_dir: &Path) -> anyhow::Result<()> {
    let state = find_state(state_dir)?;
    let pid = state
        .agent_pid()
        .context("no lb-agent is running in this network namespace")?;
    let path = state
        .config_path()
        .context("the running agent's config path is unknown")?;
    // Checked here first, so the error shows where it was typed; the agent checks again.
    config::load(&path)?;
    let before = state.reload_result().map_or(0, |(g, _)| g);
    kill(Pid::from_raw(pid), Signal::SIGHUP).context("signalling the agent")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match state.reload_result() {
            Some((g, report)) if g > before => {
                let outcome = match report.as_str() {
                    "ok" => "reloaded",
                    "unchanged" => {
                        "unchanged, nothing to apply (run-time weight and drain changes stay)"
                    }
                    _ => bail!("{}", report.trim_start_matches("error: ")),
                };
                println!("{}: {outcome}", path.display());
                return Ok(());
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    bail!("the agent (pid {pid}) did not report the reload within 30 s")
}

fn stop(state_dir: &Path, detach: bool) -> anyhow::Result<()> {
    let state = find_state(state_dir)?;
    if let Some(pid) = state.agent_pid() {
        kill(Pid::from_raw(pid), Signal::SIGTERM).context("signalling the agent")?;
        // L7 connections get SHUTDOWN_GRACE to finish.
        let deadline = Instant::now() + SHUTDOWN_GRACE + Duration::from_secs(5);
        while state.agent_pid() == Some(pid) {
            if Instant::now() > deadline {
                bail!("the agent (pid {pid}) is still running");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("lb-agent (pid {pid}) stopped");
    }
    if detach {
        self::detach(state)?;
        println!("dataplane detached and removed");
    }
    Ok(())
}

/// Removes a namespace's dataplane: the pinned links (the program detaches with the last
/// reference) and maps, the VIP addresses and the port reservation an agent added, the state.
fn detach(state: State) -> anyhow::Result<()> {
    if !state.pins().as_os_str().is_empty() {
        dataplane::remove_pins(state.pins())?;
    }
    netif::remove_addresses(&state.added_addresses());
    if let Some(range) = state.reserved_ports() {
        netif::unreserve_ports(&range)?;
    }
    state.remove()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_names_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let e = anyhow::Error::from(admin::AdminError::Bind {
            addr: "0.0.0.0:9100".parse().unwrap(),
            source: io,
        })
        .context("reloading");
        assert_eq!(
            chain(&e),
            "reloading: admin API: listening on 0.0.0.0:9100: address in use"
        );
    }
}
