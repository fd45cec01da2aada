//! Performance of the extender against the targets of its issue, on a cluster
//! of 5,000 nodes holding 100,000 volumes:
//!
//! - filter + prioritize for a pod with 3 claims over 5,000 nodes, in-process;
//! - a pod without lvmlocal claims, in-process;
//! - requests per second over HTTP on loopback;
//! - memory of the cache.
//!
//! Run with `cargo bench -p csi-scheduler`. Latencies are recorded per call
//! and reported as percentiles. The HTTP client runs in this process against
//! 127.0.0.1 only, and each run is bounded in requests and in time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use csi_scheduler::extender::{Extender, Policy};
use csi_scheduler::http::router;
use csi_scheduler::metrics::Metrics;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::watcher::Event;
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{LogicalVolume, NodeLocalStorage};
use lvmlocal_proto::extender::{ExtenderArgs, priorities_json};
use lvmlocal_proto::heartbeat;
use lvmlocal_proto::params::Placement;
use nix::time::{ClockId, clock_gettime};
use serde_json::{Value, json};

/// Counts live heap bytes while the cache is loaded, to measure what it
/// keeps; then stops, so that the timed calls do not all contend for one
/// counter.
struct CountingAllocator;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(true);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static HEAP: CountingAllocator = CountingAllocator;

const NODES: usize = 5_000;
const VOLUMES: usize = 100_000;
const GI: u64 = 1 << 30;
const LATENCY_CALLS: usize = 2_000;
const HTTP_MAX_REQUESTS: usize = 40_000;
const HTTP_MAX_TIME: Duration = Duration::from_secs(8);
const HTTP_CONNECTIONS: usize = 8;

/// A small deterministic generator, so every run builds the same cluster.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

fn node_name(i: usize) -> String {
    format!("worker-{i:04}.prod-eu-west-1.example.internal")
}

fn storage(i: usize, rng: &mut Lcg) -> NodeLocalStorage {
    let group = |media: MediaClass, total: u64| {
        json!({
            "vgName": format!("lvmlocal-{media}"),
            "totalBytes": total,
            "freeBytes": total / 2,
            "allocatedBytes": total / 2,
            "extentBytes": 4 << 20,
            "free": "stale",
        })
    };
    let disks: Vec<Value> = (0..6)
        .map(|d| {
            json!({
                "slot": format!("pci-0000:{:02x}:00.0-nvme-1", d + 1),
                "name": format!("nvme{d}n1"),
                "serial": format!("S6EXNG0T{:06}", rng.below(1_000_000)),
                "model": "SAMSUNG MZQL21T9HCJR-00A07",
                "sizeBytes": 1920383410176u64,
                "media": "nvme",
                "state": "member",
                "reason": "member of lvmlocal-nvme",
            })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "lvmlocal.io/v1alpha1",
        "kind": "NodeLocalStorage",
        "metadata": {"name": node_name(i), "resourceVersion": "48211", "uid": format!("6b1f2c3d-0000-4000-8000-{i:012}")},
        "spec": {"nodeName": node_name(i)},
        "status": {
            // Some nodes are too full for the benchmark pod's 100Gi of NVMe.
            "nvme": group(MediaClass::Nvme, (300 + rng.below(1200)) * GI),
            "ssd": group(MediaClass::Ssd, (4000 + rng.below(4000)) * GI),
            "hdd": group(MediaClass::Hdd, (32_000 + rng.below(32_000)) * GI),
            "disks": disks,
        }
    }))
    .unwrap()
}

/// The heartbeat Lease of node `i`'s agent. It lasts an hour, not the
/// agents' 40 s, so that no node falls silent while the benchmark runs.
fn heartbeat(i: usize) -> Lease {
    serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": heartbeat::lease_name(&node_name(i)),
            "namespace": "lvmlocal",
            "labels": {heartbeat::LABEL: heartbeat::LABEL_VALUE},
            "resourceVersion": "48230",
        },
        "spec": {
            "holderIdentity": node_name(i),
            "leaseDurationSeconds": 3600,
            "acquireTime": "2025-06-01T08:00:00.000000Z",
            "renewTime": "2025-06-01T09:41:17.205817Z",
        },
    }))
    .unwrap()
}

fn media_of(v: usize) -> MediaClass {
    MediaClass::ALL[v % 3]
}

fn volume(v: usize, rng: &mut Lcg) -> LogicalVolume {
    let media = media_of(v);
    let bytes = match media {
        MediaClass::Nvme => (10 + rng.below(80)) * GI,
        MediaClass::Ssd => (20 + rng.below(200)) * GI,
        MediaClass::Hdd => (100 + rng.below(1500)) * GI,
    };
    serde_json::from_value(json!({
        "apiVersion": "lvmlocal.io/v1alpha1",
        "kind": "LogicalVolume",
        "metadata": {
            "name": format!("pvc-{v:08x}-3c1d-4e2f-9a8b-7c6d5e4f3a2b"),
            "resourceVersion": "51234",
            "finalizers": ["lvmlocal.io/logical-volume"],
        },
        "spec": {
            "nodeName": node_name(v % NODES),
            "media": media,
            "sizeBytes": bytes,
            "fsType": "xfs",
            "pvc": {"namespace": format!("tenant-{}", v % 200), "name": format!("data-{v}")},
        },
        "status": {"phase": "Ready", "devicePath": format!("/dev/lvmlocal-{media}/pvc-{v:08x}"), "sizeBytes": bytes}
    }))
    .unwrap()
}

fn bound_claim(v: usize) -> PersistentVolumeClaim {
    let media = media_of(v);
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": format!("data-{v}"),
            "namespace": format!("tenant-{}", v % 200),
            "resourceVersion": "51240",
            "uid": format!("0c1d2e3f-0000-4000-8000-{v:012}"),
            "annotations": {
                "pv.kubernetes.io/bind-completed": "yes",
                "pv.kubernetes.io/bound-by-controller": "yes",
                "volume.beta.kubernetes.io/storage-provisioner": "lvmlocal.io",
                "volume.kubernetes.io/storage-provisioner": "lvmlocal.io",
                "volume.kubernetes.io/selected-node": node_name(v % NODES),
            },
            "finalizers": ["kubernetes.io/pvc-protection"],
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "100Gi"}},
            "storageClassName": media.as_str(),
            "volumeMode": "Filesystem",
            "volumeName": format!("pvc-{v:08x}-3c1d-4e2f-9a8b-7c6d5e4f3a2b"),
        },
        "status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "100Gi"}}
    }))
    .unwrap()
}

fn pending_claim(name: &str, class: &str, size: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class, "resources": {"requests": {"storage": size}}},
        "status": {"phase": "Pending"}
    }))
    .unwrap()
}

fn class(name: &str, provisioner: &str, media: Option<MediaClass>) -> StorageClass {
    let parameters = media.map(|media| json!({"lvmlocal.io/media": media}));
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "provisioner": provisioner,
        "parameters": parameters,
        "volumeBindingMode": "WaitForFirstConsumer",
    }))
    .unwrap()
}

fn pod(name: &str, volumes: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "bench", "uid": format!("uid-{name}")},
        "spec": {
            "containers": [{"name": "app", "image": "app:1", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}],
            "volumes": volumes,
        }
    }))
    .unwrap()
}

/// Feeds the cluster through the same events the watchers deliver, one
/// object at a time, as a listing does.
fn load_cluster(extender: &Extender) {
    let mut rng = Lcg(0x5eed);
    let mut inventory = extender.inventory();
    inventory.apply_class(Event::Init);
    for media in MediaClass::ALL {
        inventory.apply_class(Event::InitApply(class(
            media.as_str(),
            "lvmlocal.io",
            Some(media),
        )));
    }
    inventory.apply_class(Event::InitApply(class("gp3", "ebs.csi.aws.com", None)));
    inventory.apply_class(Event::InitDone);

    inventory.apply_storage(Event::Init);
    for i in 0..NODES {
        inventory.apply_storage(Event::InitApply(storage(i, &mut rng)));
    }
    inventory.apply_storage(Event::InitDone);

    let now = Instant::now();
    inventory.apply_lease(Event::Init, now);
    for i in 0..NODES {
        inventory.apply_lease(Event::InitApply(heartbeat(i)), now);
    }
    inventory.apply_lease(Event::InitDone, now);

    inventory.apply_volume(Event::Init);
    for v in 0..VOLUMES {
        inventory.apply_volume(Event::InitApply(volume(v, &mut rng)));
    }
    inventory.apply_volume(Event::InitDone);

    inventory.apply_claim(Event::Init);
    for v in 0..VOLUMES {
        inventory.apply_claim(Event::InitApply(bound_claim(v)));
    }
    for (name, class, size) in [
        ("fast", "nvme", "100Gi"),
        ("warm", "ssd", "200Gi"),
        ("cold", "hdd", "1Ti"),
        ("cloud", "gp3", "10Gi"),
    ] {
        inventory.apply_claim(Event::InitApply(pending_claim(name, class, size)));
    }
    inventory.apply_claim(Event::InitDone);
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

struct Percentiles {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        max: *samples.last().unwrap(),
    }
}

fn micros(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}

/// CPU time this thread has run: unlike the wall clock, it does not count
/// the time the thread waits while other processes use the cores.
fn thread_cpu_time() -> Duration {
    let time = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("thread CPU clock");
    Duration::new(time.tv_sec() as u64, time.tv_nsec() as u32)
}

struct Timings {
    wall: Percentiles,
    cpu: Percentiles,
}

/// Times `call` `LATENCY_CALLS` times after a warm-up. `prepare` builds each
/// call's input before the clock starts, and the answer is dropped after it
/// stops: freeing the request is the caller's work, as in the HTTP handler.
fn time_calls<I, O>(mut prepare: impl FnMut() -> I, mut call: impl FnMut(I) -> O) -> Timings {
    for _ in 0..LATENCY_CALLS / 10 {
        drop(call(prepare()));
    }
    let (wall, cpu) = (0..LATENCY_CALLS)
        .map(|_| {
            let input = prepare();
            let (wall, cpu) = (Instant::now(), thread_cpu_time());
            let output = std::hint::black_box(call(input));
            let took = (wall.elapsed(), thread_cpu_time() - cpu);
            drop(output);
            took
        })
        .unzip();
    Timings {
        wall: percentiles(wall),
        cpu: percentiles(cpu),
    }
}

fn args<'a>(pod: &Pod, names: &'a [String]) -> ExtenderArgs<'a> {
    ExtenderArgs {
        pod: Some(pod.clone()),
        nodes: None,
        node_names: Some(names.iter().map(|name| name.as_str().into()).collect()),
    }
}

struct HttpRun {
    requests: usize,
    elapsed: Duration,
    latency: Percentiles,
}

/// Posts `bodies` in turn (filter then prioritize) from several connections
/// until the request or time bound is reached.
async fn http_run(
    address: std::net::SocketAddr,
    bodies: Arc<Vec<(&'static str, Bytes)>>,
) -> HttpRun {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let sent = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let loops: Vec<_> = (0..HTTP_CONNECTIONS)
        .map(|_| {
            let client = client.clone();
            let bodies = bodies.clone();
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                'calls: loop {
                    for (path, body) in bodies.iter() {
                        if sent.fetch_add(1, Ordering::Relaxed) >= HTTP_MAX_REQUESTS
                            || start.elapsed() >= HTTP_MAX_TIME
                        {
                            break 'calls;
                        }
                        let request = axum::http::Request::post(format!("http://{address}{path}"))
                            .header("content-type", "application/json")
                            .body(Full::new(body.clone()))
                            .unwrap();
                        let began = Instant::now();
                        let response = client.request(request).await.expect("loopback request");
                        assert_eq!(response.status(), 200);
                        response.into_body().collect().await.expect("response body");
                        samples.push(began.elapsed());
                    }
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for handle in loops {
        samples.extend(handle.await.unwrap());
    }
    HttpRun {
        requests: samples.len(),
        elapsed: start.elapsed(),
        latency: percentiles(samples),
    }
}

fn main() {
    let baseline_heap = LIVE_BYTES.load(Ordering::Relaxed);
    let baseline_rss = rss_bytes().unwrap_or(0);
    let extender = Arc::new(Extender::new(
        Policy {
            default_placement: Placement::Binpack,
            reservation_ttl: Duration::from_secs(30),
            max_reservations: csi_scheduler::reservation::DEFAULT_LIMIT,
        },
        Metrics::new(),
    ));
    let loading = Instant::now();
    load_cluster(&extender);
    let loaded_in = loading.elapsed();
    let cache_heap = LIVE_BYTES.load(Ordering::Relaxed) - baseline_heap;
    COUNTING.store(false, Ordering::Relaxed);
    let rss = rss_bytes().unwrap_or(0);

    let names: Vec<String> = (0..NODES).map(node_name).collect();
    let kube_scheduler_sample: Vec<String> = names.iter().step_by(10).cloned().collect();
    let three_claims = pod(
        "three-claims",
        json!([
            {"name": "fast", "persistentVolumeClaim": {"claimName": "fast"}},
            {"name": "warm", "persistentVolumeClaim": {"claimName": "warm"}},
            {"name": "cold", "persistentVolumeClaim": {"claimName": "cold"}},
            {"name": "tmp", "emptyDir": {}},
        ]),
    );
    let no_claims = pod("no-claims", json!([{"name": "tmp", "emptyDir": {}}]));
    let foreign_claim = pod(
        "foreign-claim",
        json!([{"name": "cloud", "persistentVolumeClaim": {"claimName": "cloud"}}]),
    );

    let fits = extender.filter(args(&three_claims, &names));
    let passing = fits.node_names.as_ref().map_or(0, Vec::len);

    let core = time_calls(
        || (args(&three_claims, &names), args(&three_claims, &names)),
        |(filter, prioritize)| (extender.filter(filter), extender.prioritize(prioritize)),
    );
    let body =
        |pod: &Pod, names: &[String]| Bytes::from(serde_json::to_vec(&args(pod, names)).unwrap());
    let three_claims_body = body(&three_claims, &names);
    let with_json = time_calls(
        || (),
        |()| {
            let filter: ExtenderArgs = serde_json::from_slice(&three_claims_body).unwrap();
            let filtered = extender.filter(filter).to_json();
            let prioritize: ExtenderArgs = serde_json::from_slice(&three_claims_body).unwrap();
            let prioritized = priorities_json(&extender.prioritize(prioritize).unwrap());
            (filtered, prioritized)
        },
    );
    let pass_through = time_calls(
        || args(&no_claims, &names),
        |filter| extender.filter(filter),
    );
    let foreign = time_calls(
        || args(&foreign_claim, &names),
        |filter| extender.filter(filter),
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let http_runs = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = router(extender.clone(), "", 256 << 20);
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let pair = |body: Bytes| Arc::new(vec![("/filter", body.clone()), ("/prioritize", body)]);
        let mut runs = Vec::new();
        for (label, bodies) in [
            (
                "3 claims, 5,000 node names",
                pair(three_claims_body.clone()),
            ),
            (
                "3 claims, 500 node names",
                pair(body(&three_claims, &kube_scheduler_sample)),
            ),
            (
                "no claims, 500 node names",
                pair(body(&no_claims, &kube_scheduler_sample)),
            ),
        ] {
            runs.push((label, http_run(address, bodies).await));
        }
        server.abort();
        runs
    });

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20));
    println!();
    println!(
        "cluster: {NODES} nodes with a heartbeat each, {VOLUMES} volumes, {VOLUMES} bound claims; loaded in {loaded_in:.2?}"
    );
    println!("the 3-claim pod fits on {passing} of {NODES} nodes");
    println!(
        "load average at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!("| measurement | target | p50 | p99 | max | p99, thread CPU time |");
    println!("|---|---|---|---|---|---|");
    for (label, target, run) in [
        (
            "filter + prioritize, 3 claims, 5,000 nodes",
            "p99 ≤ 1 ms",
            &core,
        ),
        ("same, JSON decode and encode included", "", &with_json),
        (
            "filter, pod without claims, 5,000 nodes",
            "p99 ≤ 50 µs",
            &pass_through,
        ),
        (
            "filter, pod with another driver's claim, 5,000 nodes",
            "p99 ≤ 50 µs",
            &foreign,
        ),
    ] {
        println!(
            "| {label} | {target} | {} | {} | {} | {} |",
            micros(run.wall.p50),
            micros(run.wall.p99),
            micros(run.wall.max),
            micros(run.cpu.p99)
        );
    }
    println!();
    println!(
        "| HTTP on 127.0.0.1, filter and prioritize alternating, {HTTP_CONNECTIONS} connections | requests | requests/s | p50 | p99 |"
    );
    println!("|---|---|---|---|---|");
    for (label, run) in &http_runs {
        println!(
            "| {label} | {} | {:.0} | {} | {} |",
            run.requests,
            run.requests as f64 / run.elapsed.as_secs_f64(),
            micros(run.latency.p50),
            micros(run.latency.p99)
        );
    }
    println!();
    println!("| memory | target | measured |");
    println!("|---|---|---|");
    println!(
        "| heap kept by the cache ({NODES} nodes, {VOLUMES} volumes and claims) | ≤ 100 MB | {} |",
        mib(cache_heap as u64)
    );
    println!(
        "| process RSS after loading (before: {}) | ≤ 100 MB | {} |",
        mib(baseline_rss),
        mib(rss)
    );
}
