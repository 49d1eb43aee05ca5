//! The node guardian (`agentidp node-guardian`): runs on a machine that runs agents and sends the
//! machine's heartbeat to the server every interval: CPU, memory, load and disk from /proc and
//! statvfs, GPUs from `nvidia-smi` when it is installed, and the models the machine serves (files
//! of a directory, or the JSON a command prints). When the server is away it retries with
//! exponential back-off. The node credential comes from the environment or a file, never from
//! the command line, where other users of the machine could read it.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use uuid::Uuid;

use super::nodes::{Gpu, Metrics, Model};

/// The environment variable the credential is read from.
pub const CREDENTIAL_ENV: &str = "AGENTIDP_NODE_CREDENTIAL";

/// How the guardian runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server's base URL.
    pub url: String,
    pub node_id: Uuid,
    pub credential: String,
    pub interval: Duration,
    pub models_dir: Option<PathBuf>,
    pub models_command: Option<String>,
    /// The file system whose usage is reported.
    pub disk_path: PathBuf,
}

/// The credential: from the file when one is named, else from [`CREDENTIAL_ENV`].
pub fn credential(file: Option<&Path>) -> anyhow::Result<String> {
    let raw = match file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?,
        None => std::env::var(CREDENTIAL_ENV)
            .map_err(|_| anyhow::anyhow!("no node credential: set {CREDENTIAL_ENV} or pass --credential-file"))?,
    };
    let c = raw.trim().to_owned();
    anyhow::ensure!(c.starts_with(super::nodes::NODE_CREDENTIAL_PREFIX), "the node credential is malformed");
    Ok(c)
}

/// CPU time counters of /proc/stat's first line: (busy, total).
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    let total = field("MemTotal:").unwrap_or(0);
    let available = field("MemAvailable:").or_else(|| field("MemFree:")).unwrap_or(0);
    (total, total.saturating_sub(available))
}

fn loadavg() -> (f64, f64, f64) {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<f64> = text.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect();
    (v.first().copied().unwrap_or(0.0), v.get(1).copied().unwrap_or(0.0), v.get(2).copied().unwrap_or(0.0))
}

fn disk(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return (0, 0) };
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized, writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return (0, 0);
    }
    let block = s.f_frsize as u64;
    let total = s.f_blocks as u64 * block;
    let free = s.f_bavail as u64 * block;
    (total, total.saturating_sub(free))
}

/// GPUs as `nvidia-smi` reports them; none when it is not installed or fails.
async fn gpus() -> Vec<Gpu> {
    let out = tokio::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total,memory.used,utilization.gpu", "--format=csv,noheader,nounits"])
        .kill_on_drop(true)
        .output();
    let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(5), out).await else { return Vec::new() };
    if !out.status.success() {
        return Vec::new();
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

fn parse_nvidia_smi(text: &str) -> Vec<Gpu> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            let mib = |s: &str| s.parse::<u64>().ok().map(|m| m * 1024 * 1024);
            Some(Gpu {
                name: f.first()?.chars().take(200).collect(),
                memory_total_bytes: mib(f.get(1)?)?,
                memory_used_bytes: mib(f.get(2)?)?,
                utilization_percent: f.get(3)?.parse::<f64>().ok()?.clamp(0.0, 100.0),
            })
        })
        .filter(|g| !g.name.is_empty())
        .take(64)
        .collect()
}

/// The models: each entry of the directory (a directory counts as the sum of its files), or the
/// JSON array `[{name, size_bytes, loaded}]` the command prints.
async fn models(opts: &Options) -> Vec<Model> {
    if let Some(cmd) = &opts.models_command {
        let out = tokio::process::Command::new("sh").arg("-c").arg(cmd).kill_on_drop(true).output();
        return match tokio::time::timeout(Duration::from_secs(30), out).await {
            Ok(Ok(out)) if out.status.success() => serde_json::from_slice::<Vec<Model>>(&out.stdout)
                .map(|mut m| {
                    m.truncate(1000);
                    m
                })
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the models command printed no model list");
                    Vec::new()
                }),
            _ => {
                tracing::warn!("the models command failed");
                Vec::new()
            }
        };
    }
    let Some(dir) = &opts.models_dir else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<Model> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().chars().take(256).collect::<String>();
            if name.starts_with('.') {
                return None;
            }
            let meta = e.metadata().ok()?;
            let size_bytes = if meta.is_dir() {
                std::fs::read_dir(e.path())
                    .map(|d| d.filter_map(Result::ok).filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum())
                    .unwrap_or(0)
            } else {
                meta.len()
            };
            Some(Model { name, size_bytes, loaded: false })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.truncate(1000);
    out
}

/// Reads the machine's metrics; `previous` is the CPU counters of the last reading.
async fn read_metrics(opts: &Options, previous: &mut Option<(u64, u64)>) -> Metrics {
    let now = cpu_times();
    let cpu_percent = match (*previous, now) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => ((b1 - b0) as f64 / (t1 - t0) as f64 * 100.0).clamp(0.0, 100.0),
        _ => 0.0,
    };
    *previous = now;
    let (memory_total_bytes, memory_used_bytes) = meminfo();
    let (load_1, load_5, load_15) = loadavg();
    let (disk_total_bytes, disk_used_bytes) = disk(&opts.disk_path);
    Metrics {
        cpu_percent,
        cpu_count: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        load_1: load_1.clamp(0.0, 1_000_000.0),
        load_5: load_5.clamp(0.0, 1_000_000.0),
        load_15: load_15.clamp(0.0, 1_000_000.0),
        memory_total_bytes,
        memory_used_bytes,
        disk_total_bytes,
        disk_used_bytes,
        gpus: gpus().await,
    }
}

/// Sends heartbeats until `shutdown` resolves. A refused credential (401, 403, 404) ends it with
/// an error; a server that is away or failing is retried with back-off (1 s doubling, at most
/// five minutes or the interval, whichever is longer).
pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .user_agent(concat!("agentidp-node-guardian/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{}/api/v1/nodes/{}/heartbeat", opts.url.trim_end_matches('/'), opts.node_id);
    let mut cpu = cpu_times();
    tokio::pin!(shutdown);
    // The first CPU share needs two readings.
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        _ = &mut shutdown => return Ok(()),
    }
    let max_backoff = opts.interval.max(Duration::from_secs(300));
    let mut failures: u32 = 0;
    loop {
        let metrics = read_metrics(&opts, &mut cpu).await;
        let body = serde_json::json!({ "metrics": metrics, "models": models(&opts).await });
        let wait = match client.post(&url).bearer_auth(&opts.credential).json(&body).send().await {
            Ok(resp) if resp.status().is_success() => {
                if failures > 0 {
                    tracing::info!("the server answers again");
                }
                failures = 0;
                opts.interval
            }
            Ok(resp) if matches!(resp.status().as_u16(), 401 | 403 | 404) => {
                anyhow::bail!(
                    "the server refused the node credential ({}): is it this node's, and current?",
                    resp.status()
                );
            }
            outcome => {
                let why = match outcome {
                    Ok(resp) => format!("status {}", resp.status()),
                    Err(e) => e.without_url().to_string(),
                };
                failures = failures.saturating_add(1);
                let wait = Duration::from_secs(1u64 << failures.min(16).saturating_sub(1)).min(max_backoff);
                tracing::warn!(error = %why, retry_in_secs = wait.as_secs(), "heartbeat failed");
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_lines_parse() {
        let g = parse_nvidia_smi("NVIDIA A100-SXM4-40GB, 40960, 1024, 37\nbroken line\n");
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].name, "NVIDIA A100-SXM4-40GB");
        assert_eq!(g[0].memory_total_bytes, 40960 * 1024 * 1024);
        assert_eq!(g[0].utilization_percent, 37.0);
    }

    #[test]
    fn this_machine_has_metrics() {
        let (total, used) = meminfo();
        assert!(total > 0 && used <= total);
        assert!(cpu_times().is_some_and(|(b, t)| b <= t && t > 0));
        let (dt, du) = disk(Path::new("/"));
        assert!(dt > 0 && du <= dt);
    }
}
