//! The API over real HTTP on loopback, with a stand-in for the main loop that applies changes
//! to real overrides and publishes a rebuilt view. Also the fixture the status and metrics
//! tests share.

use std::sync::Arc;

use lb_common::counters::{Counter, ListenerStats};

use super::*;
use crate::{
    config::{parse, Host},
    dataplane::Snapshot,
    gc::SnatPorts,
    plan,
};

const TEXT: &str = "\
agent: { interfaces: [lo] }
snat: { addresses: [10.0.0.9, 'fd00::9'], ports: 20000-20099 }
listeners:
  - { name: web, protocol: tcp, vip: 10.1.0.1, port: 80, pool: web }
  - name: site
    protocol: http
    vip: 10.1.0.1
    port: 8080
    pool: web
    routes: [{ path_prefix: /api, pool: api }]
pools:
  - name: web
    health_check: { protocol: tcp }
    backends:
      - { address: 10.0.0.1, port: 80, weight: 2 }
      - { address: 10.0.0.2, port: 80 }
  - name: api
    backends:
      - { address: 10.0.0.3, port: 81 }
";

/// The fixture's state: config, health (nothing probed yet: `web` is pending) and L7 counters.
pub(crate) struct Fixture {
    pub config: Config,
    pub health: Arc<Health>,
    pub requests: Vec<Arc<RequestStats>>,
}

impl Fixture {
    pub fn new() -> Self {
        let config = parse("lb.yaml", TEXT, &Host::default()).unwrap();
        let health = Arc::new(Health::new(&config));
        let site = RequestStats::new("site");
        site.record(200, Duration::from_millis(2));
        site.record(200, Duration::from_millis(30));
        site.record(503, Duration::from_millis(1));
        Self {
            config,
            health,
            requests: vec![Arc::new(site)],
        }
    }

    /// A view with made-up datapath counters: every global counter `10 + its index`, listener
    /// `web` and each backend `id` with traffic derived from the id.
    pub fn view(&self, overrides: &Overrides) -> View {
        let ids = plan::Ids::assign(&self.config, &plan::Ids::default());
        let plan = plan::build_with(&self.config, &ids, overrides, |_, _| true);
        let traffic = |n: u64| ListenerStats {
            packets_in: n,
            bytes_in: n * 100,
            packets_out: n + 1,
            bytes_out: (n + 1) * 100,
            new_flows: n / 2,
        };
        let counters = Snapshot {
            counters: Counter::ALL.iter().map(|&c| (c, 10 + c as u64)).collect(),
            listeners: vec![traffic(40)],
        };
        let backends: Vec<_> = (0..plan.backends.len() as u64).map(traffic).collect();
        let sweep = gc::Report {
            entries: 12,
            tables: [8, 2, 2, 0],
            expired: 0,
            active: vec![6],
            backend_active: vec![4, 2, 0],
            snat: vec![
                SnatPorts {
                    in_use: 6,
                    busiest_backend: 4,
                },
                SnatPorts::default(),
            ],
            ..gc::Report::default()
        };
        let status = Status::build(&Inputs {
            config_path: Path::new("/etc/lb/lb.yaml"),
            config: &self.config,
            plan: &plan,
            overrides,
            health: &self.health,
            sweep: &sweep,
            counters: &counters,
            backends: &backends,
            requests: &self.requests,
        });
        View {
            status,
            requests: self.requests.clone(),
        }
    }
}

/// The API on an ephemeral loopback port, with a main-loop stand-in applying its commands.
async fn api() -> SocketAddr {
    let f = Fixture::new();
    let (views, rx) = watch::channel(Arc::new(f.view(&Overrides::default())));
    let (tx, mut commands) = mpsc::channel::<Command>(4);
    tokio::spawn(async move {
        let mut overrides = Overrides::default();
        while let Some(c) = commands.recv().await {
            let result = overrides.set(&f.config, &c.pool, c.backend, c.change);
            overrides.apply_to(&f.health);
            views.send_replace(Arc::new(f.view(&overrides)));
            c.reply(result);
        }
    });
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    tokio::spawn(accept(tcp, rx, tx));
    addr
}

async fn call(addr: SocketAddr, method: Method, path: &str, body: &str) -> (u16, String) {
    let (code, body) = client::request(addr, method, path, body).await.unwrap();
    (code.as_u16(), String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn status_and_metrics_are_served_with_their_content_types() {
    let addr = api().await;
    let status = client::status(addr).await.unwrap();
    assert_eq!(status, Fixture::new().view(&Overrides::default()).status);
    let (code, _) = client::request(addr, Method::GET, "/metrics", "")
        .await
        .unwrap();
    assert_eq!(code, StatusCode::OK);
    let metrics = client::get(addr, "/metrics").await.unwrap();
    assert!(std::str::from_utf8(&metrics)
        .unwrap()
        .contains("lb_http_requests_total{listener=\"site\",code=\"503\"} 1"));
}

#[tokio::test]
async fn weight_and_drain_change_the_backend_and_answer_with_it() {
    let addr = api().await;
    let (code, body) = call(
        addr,
        Method::POST,
        "/backends/web/10.0.0.2:80/weight",
        "{\"weight\": 5}",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pool"], "web");
    assert_eq!(v["address"], "10.0.0.2:80");
    assert_eq!(
        (v["weight"].as_u64(), v["configured_weight"].as_u64()),
        (Some(5), Some(1))
    );

    let (code, _) = call(
        addr,
        Method::POST,
        "/backends/web/10.0.0.2:80/weight",
        " 7\n",
    )
    .await;
    assert_eq!(code, 200, "a bare number");
    let (code, body) = call(addr, Method::POST, "/backends/web/10.0.0.1:80/drain", "").await;
    assert_eq!(code, 200, "{body}");
    let status = client::status(addr).await.unwrap();
    let b = status
        .backend("web", "10.0.0.1:80".parse().unwrap())
        .unwrap();
    assert!(
        b.drained && b.weight == 0 && b.configured_weight == 2,
        "{b:?}"
    );
    assert_eq!(
        status
            .backend("web", "10.0.0.2:80".parse().unwrap())
            .unwrap()
            .weight,
        7
    );

    let (code, _) = call(
        addr,
        Method::POST,
        "/backends/web/10.0.0.1:80/drain",
        "{\"drain\": false}",
    )
    .await;
    assert_eq!(code, 200);
    let status = client::status(addr).await.unwrap();
    let b = status
        .backend("web", "10.0.0.1:80".parse().unwrap())
        .unwrap();
    assert!(!b.drained && b.weight == 2, "{b:?}");
}

#[tokio::test]
async fn unknown_pools_and_backends_are_404_and_bad_requests_400_all_in_json() {
    let addr = api().await;
    let weight = |pool: &str, backend: &str| format!("/backends/{pool}/{backend}/weight");
    for (path, body, code, message) in [
        (weight("nope", "10.0.0.1:80"), "1", 404, "no pool `nope`"),
        (
            weight("web", "10.0.0.3:81"),
            "1",
            404,
            "pool `web` has no backend 10.0.0.3:81",
        ),
        // IPv6 in brackets, raw or percent-encoded.
        (
            weight("web", "[fd00::2]:80"),
            "1",
            404,
            "pool `web` has no backend [fd00::2]:80",
        ),
        (
            weight("web", "%5Bfd00%3A%3A2%5D:80"),
            "1",
            404,
            "pool `web` has no backend [fd00::2]:80",
        ),
        (
            weight("web", "10.0.0.1"),
            "1",
            400,
            "`10.0.0.1` is not IP:PORT or [IPv6]:PORT",
        ),
        (
            weight("web", "10.0.0.1:80"),
            "heavy",
            400,
            "expected a weight, {\"weight\": N} or N, got `heavy`",
        ),
        (
            weight("web", "10.0.0.1:80"),
            "-1",
            400,
            "expected a weight, {\"weight\": N} or N, got `-1`",
        ),
        (
            weight("web", "10.0.0.1:80"),
            "{\"weight\": 70000}",
            400,
            "weight 70000 is out of range 0-65535",
        ),
        (
            "/backends/web/10.0.0.1:80/drain".into(),
            "maybe",
            400,
            "expected no body, true, false or {\"drain\": BOOL}, got `maybe`",
        ),
        (
            "/nothing".into(),
            "",
            404,
            "no endpoint /nothing (try /status or /metrics)",
        ),
    ] {
        let (got, body) = call(addr, Method::POST, &path, body).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((got, v["error"].as_str()), (code, Some(message)), "{path}");
    }
    let (code, body) = call(addr, Method::DELETE, "/status", "").await;
    assert_eq!(code, 405, "{body}");
    let (code, _) = call(addr, Method::GET, "/backends/web/10.0.0.1:80/drain", "").await;
    assert_eq!(code, 405);
    // Nothing was changed by the refused requests.
    let status = client::status(addr).await.unwrap();
    assert_eq!(status, Fixture::new().view(&Overrides::default()).status);
}
