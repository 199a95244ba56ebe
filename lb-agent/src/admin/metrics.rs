//! `/metrics` in the Prometheus text exposition format (version 0.0.4): counters end in
//! `_total`, units are base units (bytes, seconds), and every family has `# HELP` and
//! `# TYPE` before its samples, which are contiguous.

use std::fmt::{Display, Write as _};

use super::{
    status::{Backend, ConntrackTable, HealthState, Snat, Traffic},
    View,
};

/// The Content-Type of the format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders every metric of `view`. L7 request metrics are read live from their counters.
pub fn render(view: &View) -> String {
    let s = &view.status;
    let mut w = Writer::default();

    w.family(
        "lb_xdp_packets_total",
        "counter",
        "Packets seen by the XDP program, by the reason of its verdict (pass, forwarded, \
         fwd_kernel, drop_*, rst_no_backend, ...); every packet counts once.",
    );
    for (reason, n) in &s.packets {
        w.sample("lb_xdp_packets_total", &[("reason", reason.clone())], n);
    }

    // tcp/udp listeners: the datapath's per-listener counters.
    let listeners: Vec<(Labels, &Traffic)> = s
        .listeners
        .iter()
        .filter_map(|l| Some((vec![("listener", l.name.clone())], l.traffic.as_ref()?)))
        .collect();
    traffic(&mut w, "listener", &listeners);

    // Backends once per pool, though several listeners may show the same pool.
    let backends: Vec<(Labels, &Backend)> = s
        .pools()
        .into_iter()
        .flat_map(|p| {
            p.backends.iter().map(move |b| {
                let labels = vec![("pool", p.name.clone()), ("backend", b.address.to_string())];
                (labels, b)
            })
        })
        .collect();
    let backend_traffic: Vec<(Labels, &Traffic)> = backends
        .iter()
        .map(|(l, b)| (l.clone(), &b.traffic))
        .collect();
    traffic(&mut w, "backend", &backend_traffic);
    let gauges: [BackendGauge; 5] = [
        (
            "lb_backend_up",
            "1 when the backend passes its health checks (or has none), else 0.",
            |b| Some(f64::from(u8::from(b.up))),
        ),
        (
            "lb_backend_probe_latency_seconds",
            "Duration of the backend's last health probe.",
            |b| b.probe_latency_ms.map(|ms| ms / 1e3),
        ),
        (
            "lb_backend_weight",
            "Weight new flows and requests see (0 while drained).",
            |b| Some(f64::from(b.weight)),
        ),
        (
            "lb_backend_drained",
            "1 when the backend was drained through the admin API.",
            |b| Some(f64::from(u8::from(b.drained))),
        ),
        (
            "lb_backend_l7_backoff_seconds",
            "Seconds the L7 proxy still sends the backend no new requests after a failed \
             connect (0: none).",
            |b| Some(b.l7_backoff_s.unwrap_or(0.0)),
        ),
    ];
    for (name, help, value) in gauges {
        w.family(name, "gauge", help);
        for (labels, b) in &backends {
            if let Some(v) = value(b) {
                w.sample(name, labels, v);
            }
        }
    }
    w.family(
        "lb_backend_health_state",
        "gauge",
        "1 for the backend's current health state (healthy, unhealthy, pending, unchecked, \
         draining: weight 0), 0 for the others.",
    );
    for (labels, b) in &backends {
        for state in HealthState::ALL {
            let mut l = labels.clone();
            l.push(("state", state.as_str().into()));
            w.sample("lb_backend_health_state", &l, u8::from(b.health == state));
        }
    }

    let snat: Vec<(Labels, &Snat)> = s
        .snat
        .iter()
        .map(|n| (vec![("snat_address", n.address.to_string())], n))
        .collect();
    w.family(
        "lb_snat_ports_in_use",
        "gauge",
        "SNAT ports held by flows at the last conntrack sweep, per SNAT address.",
    );
    for (labels, n) in &snat {
        w.sample("lb_snat_ports_in_use", labels, n.ports_in_use);
    }
    w.family(
        "lb_snat_busiest_backend_ports_in_use",
        "gauge",
        "SNAT ports held towards the busiest backend, per SNAT address: a port is unique per \
         address and backend, so this reaching lb_snat_port_range_size exhausts the address.",
    );
    for (labels, n) in &snat {
        w.sample(
            "lb_snat_busiest_backend_ports_in_use",
            labels,
            n.busiest_backend_ports,
        );
    }
    w.family(
        "lb_snat_port_range_size",
        "gauge",
        "Ports in the SNAT port range (per SNAT address and backend).",
    );
    let range = s.snat.first().map_or(0, |n| n.port_range);
    w.sample("lb_snat_port_range_size", &[], range);

    w.family(
        "lb_conntrack_entries",
        "gauge",
        "Connection-tracking entries at the last sweep (two per flow), in all tables.",
    );
    w.sample("lb_conntrack_entries", &[], s.conntrack.entries);
    w.family(
        "lb_conntrack_entries_limit",
        "gauge",
        "Connection-tracking entries all tables hold (each evicts its oldest when full).",
    );
    w.sample("lb_conntrack_entries_limit", &[], s.conntrack.capacity);
    let per_table: [TableGauge; 2] = [
        (
            "lb_conntrack_table_entries",
            "Connection-tracking entries at the last sweep, per table (ipv4, ipv6: established \
             flows; ipv4_handshake, ipv6_handshake: unanswered ones).",
            |t| t.entries,
        ),
        (
            "lb_conntrack_table_entries_limit",
            "Connection-tracking entries a table holds before its oldest are evicted.",
            |t| t.capacity,
        ),
    ];
    for (name, help, value) in per_table {
        w.family(name, "gauge", help);
        for t in &s.conntrack.tables {
            w.sample(name, &[("table", t.table.clone())], value(t));
        }
    }

    w.family(
        "lb_http_requests_total",
        "counter",
        "Requests answered by http/https listeners, by status code (499: the client left \
         before the answer).",
    );
    for r in &view.requests {
        for (code, n) in r.codes() {
            let labels = vec![("listener", r.listener.clone()), ("code", code.to_string())];
            w.sample("lb_http_requests_total", &labels, n);
        }
    }
    w.family(
        "lb_http_connections",
        "gauge",
        "Client connections open on each L7 worker of an http/https listener (new ones go to \
         the worker with fewer).",
    );
    for r in &view.requests {
        for (worker, n) in r.connections().into_iter().enumerate() {
            let labels = vec![
                ("listener", r.listener.clone()),
                ("worker", worker.to_string()),
            ];
            w.sample("lb_http_connections", &labels, n);
        }
    }
    let name = "lb_http_request_duration_seconds";
    w.family(
        name,
        "histogram",
        "Time from a request's arrival to the last byte of its answer, by http/https listener.",
    );
    for r in &view.requests {
        let h = r.latency();
        let listener = vec![("listener", r.listener.clone())];
        let le = |bound: String| {
            let mut l = listener.clone();
            l.push(("le", bound));
            l
        };
        for (bound, n) in &h.buckets {
            w.sample(&format!("{name}_bucket"), &le(bound.to_string()), n);
        }
        w.sample(&format!("{name}_bucket"), &le("+Inf".into()), h.count);
        w.sample(&format!("{name}_sum"), &listener, h.sum_seconds);
        w.sample(&format!("{name}_count"), &listener, h.count);
    }
    w.out
}

/// A per-backend gauge: name, help and value (none: no sample).
type BackendGauge = (&'static str, &'static str, fn(&Backend) -> Option<f64>);

/// A per-conntrack-table gauge: name, help and value.
type TableGauge = (&'static str, &'static str, fn(&ConntrackTable) -> u64);

/// Label names and values of one sample.
type Labels = Vec<(&'static str, String)>;

/// A counter by direction: unit, help, and the (in, out) values.
type Directed = (&'static str, String, fn(&Traffic) -> [u64; 2]);
/// A flow metric: name suffix, type, help, value.
type Flows = (&'static str, &'static str, String, fn(&Traffic) -> u64);

/// Packets and bytes (each by direction), new flows and active flows of `what` (`listener` or
/// `backend`).
fn traffic(w: &mut Writer, what: &str, items: &[(Labels, &Traffic)]) {
    let directed: [Directed; 2] = [
        (
            "packets",
            format!(
                "Packets of the {what}'s flows through the XDP program, by direction (in: \
                 client to backend, out: backend to client)."
            ),
            |t| [t.packets_in, t.packets_out],
        ),
        (
            "bytes",
            format!(
                "Bytes (Ethernet frames) of the {what}'s flows through the XDP program, by \
                 direction."
            ),
            |t| [t.bytes_in, t.bytes_out],
        ),
    ];
    for (unit, help, values) in directed {
        let name = format!("lb_{what}_{unit}_total");
        w.family(&name, "counter", &help);
        for (labels, t) in items {
            for (direction, v) in ["in", "out"].into_iter().zip(values(t)) {
                let mut l = labels.clone();
                l.push(("direction", direction.into()));
                w.sample(&name, &l, v);
            }
        }
    }
    let flows: [Flows; 2] = [
        (
            "new_flows_total",
            "counter",
            format!("Flows the XDP program scheduled to the {what}."),
            |t| t.new_flows,
        ),
        (
            "active_flows",
            "gauge",
            format!("Live (not closing) flows of the {what} at the last conntrack sweep."),
            |t| t.active_flows,
        ),
    ];
    for (suffix, kind, help, value) in flows {
        let name = format!("lb_{what}_{suffix}");
        w.family(&name, kind, &help);
        for (labels, t) in items {
            w.sample(&name, labels, value(t));
        }
    }
}

#[derive(Default)]
struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', r"\\")
                    .replace('"', "\\\"")
                    .replace('\n', r"\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

#[cfg(test)]
mod tests;
