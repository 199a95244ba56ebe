//! `lb-agent run | check`: the command line. Everything else lives in the library.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_agent::{config, dataplane::Dataplane, gc, health::Health, netif, plan, proxy, stats};
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

/// How long in-flight L7 requests get to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

fn run(path: PathBuf) -> anyhow::Result<()> {
    let cfg = config::load(&path)?;
    let health = std::sync::Arc::new(Health::new(&cfg));
    // Probed backends start offline (a new backend is online after its first success).
    let mut plan = plan::build_with(&cfg, |p, b| health.is_up(p, b));
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
        let proxies = proxy::start(&cfg, &health, stopped, SHUTDOWN_GRACE)
            .await
            .context("starting the L7 proxy")?;
        // Dropped at the end of this block, which stops the probes.
        let _checks = health.start(&cfg);
        info!(config = %path.display(), listeners = cfg.listeners.len(), backends = plan.backends.len(), "running");
        let mut sweep = tokio::time::interval(gc::INTERVAL);
        // A sweep of a full table takes seconds (two syscalls per entry): the next one waits
        // its interval instead of following at once, so the agent never sweeps non-stop.
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = gc::Report::default();
        loop {
            tokio::select! {
                // Signals first: with the sweep always ready, a random pick could leave SIGTERM
                // waiting for several sweeps.
                biased;
                _ = term.recv() => { info!("SIGTERM"); break; }
                _ = int.recv() => { info!("SIGINT"); break; }
                _ = usr1.recv() => print!("{}", stats::render_health(&health)),
                // L7 pools read the health directly; the L4 tables are rebuilt and swapped in.
                _ = health.changed() => {
                    // One snapshot for the tables and the log line: probes keep changing it.
                    let up = health.snapshot();
                    plan = plan::build_with(&cfg, |p, b| up.is_up(p, b));
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
                _ = sweep.tick() => match tokio::task::block_in_place(|| dp.gc(&plan, gc::monotonic_ns())) {
                    Ok(r) => {
                        if r.expired > 0 {
                            debug!(expired = r.expired, entries = r.entries, "conntrack sweep");
                        }
                        last = r;
                    }
                    Err(e) => warn!(error = %e, "conntrack sweep failed"),
                },
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
