//! Benchmarks beside the peers a user would pick instead. `cloud-bench dns` is in [`dns`].
//!
//! `cloud-bench deploy`: deploy-to-ready time and per-instance memory of the node agent, measured beside the
//! peer a user would compare with: the built-in `hello` image's program started directly on the host, with no
//! sandbox, namespace, bridge or API in between. Needs root (the node agent does).
//!
//! Usage: `cargo run --release -p cloud-bench -- deploy [--instances 50]`

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cloud_store::{ChangeFeed, Settings};
use cloud_tests::TestApi;
use serde_json::{Value, json};

mod dns;
mod edge;
mod hosts;

/// The allocator `cloudd` runs with, so the edge measured in this process allocates as in production.
#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

/// What a data structure costs on the heap: an allocator that counts the bytes allocated and not freed while a
/// measurement is on (the resident size cannot tell: the allocator reuses memory freed by earlier phases).
mod heap {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};

    static ON: AtomicBool = AtomicBool::new(false);
    static NET: AtomicI64 = AtomicI64::new(0);

    pub struct Counting;

    fn count(bytes: i64) {
        // One shared counter, touched only while measuring: the load-only check costs the edge runs nothing.
        if ON.load(Relaxed) {
            NET.fetch_add(bytes, Relaxed);
        }
    }

    // SAFETY: every call goes unchanged to mimalloc, which keeps `GlobalAlloc`'s contract; counting only
    // touches atomics and never allocates.
    #[allow(unsafe_code)]
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as i64);
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as i64);
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(-(layout.size() as i64));
            unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(new_size as i64 - layout.size() as i64);
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }

    /// Starts counting from zero.
    pub fn start() {
        NET.store(0, Relaxed);
        ON.store(true, Relaxed);
    }

    /// Stops counting: the bytes allocated and not freed since [`start`].
    pub fn stop() -> i64 {
        ON.store(false, Relaxed);
        NET.load(Relaxed)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("dns") {
        let mut names = 100_000usize;
        let mut seconds = 10u64;
        let mut it = args[1..].iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--names" => names = it.next().context("--names N")?.parse()?,
                "--seconds" => seconds = it.next().context("--seconds N")?.parse()?,
                other => bail!("unknown argument {other}"),
            }
        }
        return dns::run(names, seconds).await;
    }
    if args.first().map(String::as_str) == Some("edge") {
        let (mut seconds, mut connections, mut routes, mut runs) = (10u64, 64usize, 100_000usize, 3usize);
        let mut it = args[1..].iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--seconds" => seconds = it.next().context("--seconds N")?.parse()?,
                "--connections" => connections = it.next().context("--connections N")?.parse()?,
                "--routes" => routes = it.next().context("--routes N")?.parse()?,
                "--runs" => runs = it.next().context("--runs N")?.parse::<usize>()?.max(1),
                other => bail!("unknown argument {other}"),
            }
        }
        return edge::run(seconds, connections, routes, runs).await;
    }
    if args.first().map(String::as_str) == Some("hosts") {
        let (mut seconds, mut connections, mut runs) = (10u64, 32usize, 3usize);
        let mut it = args[1..].iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--seconds" => seconds = it.next().context("--seconds N")?.parse()?,
                "--connections" => connections = it.next().context("--connections N")?.parse()?,
                "--runs" => runs = it.next().context("--runs N")?.parse::<usize>()?.max(1),
                other => bail!("unknown argument {other}"),
            }
        }
        return hosts::run(seconds, connections, runs).await;
    }
    if args.first().map(String::as_str) != Some("deploy") {
        bail!(
            "usage: cloud-bench deploy [--instances N] | cloud-bench dns [--names N] [--seconds S] | \
             cloud-bench edge [--seconds S] [--connections N] [--routes N] [--runs N] | \
             cloud-bench hosts [--seconds S] [--connections N] [--runs N]"
        );
    }
    let mut n = 50usize;
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--instances" => n = it.next().context("--instances N")?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    deploy(n).await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mem_available_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The built-in `hello` image's program, taken out of its layer into a directory of its own.
pub(crate) fn hello_program() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("cloud-bench-hello-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut budget = cloud_oci::layer::Budget::new(cloud_oci::Limits::default());
    for layer in &cloud_builtin::hello().layer_blobs {
        cloud_oci::layer::flatten(&layer.data, &dir, &mut budget)?;
    }
    Ok(dir.join("hello"))
}

/// The peer: the `hello` program started directly on loopback, timed from spawn to its port accepting.
fn direct_starts(n: usize) -> anyhow::Result<(Vec<Duration>, u64)> {
    let hello = hello_program()?;
    let mut times = Vec::new();
    let mut rss = 0;
    for i in 0..n {
        let port = 20000 + (std::process::id() as u16 % 1000) * 10 + (i as u16 % 10);
        let t0 = Instant::now();
        let mut child = Command::new(&hello)
            .env("PORT", port.to_string())
            .env("PRIVATE_IP", "127.0.0.1")
            .env("INSTANCE", format!("direct-{i}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("direct hello did not listen");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        times.push(t0.elapsed());
        rss += cloud_tests::proc_status_kib(child.id(), "VmRSS").unwrap_or(0);
        child.kill()?;
        child.wait()?;
    }
    Ok((times, rss / n as u64))
}

async fn deploy(n: usize) -> anyhow::Result<()> {
    let (direct, direct_rss) = direct_starts(n)?;

    let settings = Settings { tenant_pool: "10.250.0.0/16".parse()?, tenant_prefix: 20, ..Settings::default() };
    let api = TestApi::start_with_settings(settings, Default::default()).await;
    let feed = ChangeFeed::start(api.store.clone()).await?;
    let state = std::env::temp_dir().join(format!("cloud-bench-{}", std::process::id()));
    let mut cfg = cloud_runtime::NodeConfig::new("bench".into(), state);
    cfg.heartbeat = Duration::from_millis(500);
    let node = cloud_runtime::start(api.store.clone(), feed, cfg).await?;
    let client = reqwest::Client::new();
    let before = mem_available_kb();
    let mut deploys = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        let res: Value = client
            .post(api.url("/v1/instances"))
            .bearer_auth(&api.token)
            .json(&json!({"image": "hello", "name": format!("b{i}"), "memory_mb": 64}))
            .send()
            .await?
            .json()
            .await?;
        let name = res["instances"][0]["name"].as_str().context("created")?.to_owned();
        loop {
            let i: Value = client
                .get(api.url(&format!("/v1/instances/{name}")))
                .bearer_auth(&api.token)
                .send()
                .await?
                .json()
                .await?;
            if i["state"] == "running" {
                break;
            }
            if i["state"] == "failed" || t0.elapsed() > Duration::from_secs(60) {
                bail!("instance {name} did not become ready: {i}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        deploys.push(t0.elapsed());
    }
    let after = mem_available_kb();
    // Per instance: every process of its sandbox (the init and the program), as its namespace lists them.
    let node_ns = cloud_runtime::netns_name(node.node, uuid::Uuid::nil());
    let prefix = node_ns.trim_end_matches('0');
    let mut sandboxes = 0u64;
    let mut rss = 0u64;
    for ns in std::fs::read_dir("/run/netns")?.flatten().filter_map(|e| e.file_name().into_string().ok()) {
        if !ns.starts_with(prefix) {
            continue;
        }
        let out = Command::new("ip").args(["netns", "pids", &ns]).output()?;
        let pids = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect::<Vec<u32>>();
        rss += pids.iter().map(|p| cloud_tests::proc_status_kib(*p, "VmRSS").unwrap_or(0)).sum::<u64>();
        sandboxes += 1;
    }
    let rss = rss / sandboxes.max(1);
    node.shutdown().await;

    let (mut direct, mut deploys) = (direct, deploys);
    direct.sort();
    deploys.sort();
    let (d50, d99, p50, p99) =
        (percentile(&direct, 0.5), percentile(&direct, 0.99), percentile(&deploys, 0.5), percentile(&deploys, 0.99));
    println!("deploy-to-ready over {n} instances (sequential; API create -> state running observed by polling)");
    println!("| | median ms | p99 ms |");
    println!("|---|---|---|");
    println!("| platform: POST /v1/instances -> running | {:.1} | {:.1} |", ms(p50), ms(p99));
    println!("| peer: the same program spawned directly -> listening | {:.1} | {:.1} |", ms(d50), ms(d99));
    println!("| ratio (platform / peer) | {:.1}x | {:.1}x |", ms(p50) / ms(d50), ms(p99) / ms(d99));
    println!();
    println!("memory per instance");
    println!("| | KiB |");
    println!("|---|---|");
    println!("| RSS of its sandbox's processes (init and program) | {rss} |");
    println!("| process RSS started directly | {direct_rss} |");
    println!(
        "| host memory used per instance (MemAvailable drop / {n}: processes, writable layer, mounts, namespace, veth, cgroup, agent) | {} |",
        before.saturating_sub(after) / n as u64
    );
    Ok(())
}
