//! `lb-agent run | check | status | stats | diagnose`: the command line. Everything else lives
//! in the library.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use lb_agent::{
    admin, cli, config, dataplane::Dataplane, gc, health::Health, netif, overrides, plan, proxy,
    stats,
};
use tracing::{debug, error, info, warn};

#[derive(Parser)]
#[command(version, about = "XDP L4 FullNAT load balancer agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the XDP program, fill its maps from the config and run until SIGINT/SIGTERM, then
    /// detach and clean up.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file (syntax, fields, cross-references, addresses of this host).
    Check {
        #[arg(long, short)]
        config: PathBuf,
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
        Command::Run { config } => run(config),
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
            eprintln!("error: {e:#}");
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
            eprintln!("error: {e:#}");
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

/// How long in-flight L7 requests get to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

fn run(path: PathBuf) -> anyhow::Result<()> {
    let cfg = config::load(&path)?;
    let health = std::sync::Arc::new(Health::new(&cfg));
    // Weight and drain changes from the admin API; cleared when the config is replaced.
    let mut overrides = overrides::Overrides::default();
    // Probed backends start offline (a new backend is online after its first success).
    let mut plan = plan::build_with(&cfg, &overrides, |p, b| health.is_up(p, b));
    let mut dp = Dataplane::load().context("loading the XDP program")?;
    dp.apply(&plan).context("filling the maps")?;
    for iface in &cfg.agent.interfaces {
        netif::prepare_interface(iface).with_context(|| format!("preparing {iface}"))?;
    }
    if cfg.listeners.iter().any(|l| l.vip.is_ipv6()) {
        netif::enable_ipv6_forwarding()?;
    }
    if let Some(snat) = &cfg.snat {
        netif::reserve_ports(snat.ports).context("reserving the SNAT port range")?;
    }
    let local = config::Host::current()?.addresses.unwrap_or_default();
    let vips: Vec<_> = cfg.listeners.iter().map(|l| l.vip).collect();
    let _vips = netif::VipAddresses::add(&vips, &local, &cfg.agent.interfaces[0])?;
    for iface in &cfg.agent.interfaces {
        dp.attach(iface, cfg.agent.xdp_mode)?;
    }

    // Multi-threaded for the L7 proxy (one worker per core); the L4 path needs no runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let last_sweep = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let (stop, stopped) = tokio::sync::watch::channel(());
        let (requests, proxies) = proxy::start(&cfg, &health, stopped, SHUTDOWN_GRACE)
            .await
            .context("starting the L7 proxy")?;
        // The admin API shows the views published here and sends back weight and drain changes.
        let (publisher, views) = admin::Publisher::new(&path, health.clone(), requests);
        let (changes, mut commands) = tokio::sync::mpsc::channel(16);
        admin::serve(cfg.agent.admin, views, changes).await?;
        // Dropped at the end of this block, which stops the probes.
        let _checks = health.start(&cfg);
        info!(config = %path.display(), listeners = cfg.listeners.len(), backends = plan.backends.len(), "running");
        let mut sweep = tokio::time::interval(gc::INTERVAL);
        let mut last = gc::Report::default();
        tokio::task::block_in_place(|| publisher.publish(&dp, &cfg, &plan, &overrides, &last));
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM"); break; }
                _ = int.recv() => { info!("SIGINT"); break; }
                _ = usr1.recv() => print!("{}", stats::render_health(&health)),
                // L7 pools read the health directly; the L4 tables are rebuilt and swapped in.
                _ = health.changed() => {
                    // One snapshot for the tables and the log line: probes keep changing it.
                    let up = health.snapshot();
                    plan = plan::build_with(&cfg, &overrides, |p, b| up.is_up(p, b));
                    match tokio::task::block_in_place(|| dp.apply(&plan)) {
                        Ok(()) => info!(
                            healthy = up.healthy(),
                            backends = plan.backends.len(),
                            down = %up.down(&cfg, 10),
                            "backend tables updated for health"
                        ),
                        Err(e) => error!(error = %e, "updating the backend tables for health"),
                    }
                }
                // A sweep is blocking map syscalls: keep it off the proxy's workers' queue.
                _ = sweep.tick() => tokio::task::block_in_place(|| {
                    match dp.gc(&plan, gc::monotonic_ns()) {
                        Ok(r) => {
                            if r.expired > 0 {
                                debug!(expired = r.expired, entries = r.entries, "conntrack sweep");
                            }
                            last = r;
                        }
                        Err(e) => warn!(error = %e, "conntrack sweep failed"),
                    }
                    publisher.publish(&dp, &cfg, &plan, &overrides, &last);
                }),
                Some(c) = commands.recv() => {
                    let result = overrides.set(&cfg, &c.pool, c.backend, c.change);
                    if result.is_ok() {
                        info!(pool = %c.pool, backend = %c.backend, change = ?c.change, "admin change");
                        overrides.apply_to(&health);
                        plan = plan::build_with(&cfg, &overrides, |p, b| health.is_up(p, b));
                        tokio::task::block_in_place(|| {
                            if let Err(e) = dp.apply(&plan) {
                                error!(error = %e, "updating the backend tables for an admin change");
                            }
                            publisher.publish(&dp, &cfg, &plan, &overrides, &last);
                        });
                    }
                    c.reply(result);
                }
            }
        }
        let _ = stop.send(());
        proxies.await;
        anyhow::Ok(last)
    })?;

    dp.detach_all();
    match dp.snapshot(plan.listeners.len()) {
        Ok(s) => print!(
            "{}{}",
            stats::render(&s, &plan, &last_sweep.active),
            stats::render_health(&health)
        ),
        Err(e) => error!(error = %e, "reading counters"),
    }
    Ok(())
}
