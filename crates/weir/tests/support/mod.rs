//! Test support: real `weir` server and worker processes on loopback ports.
//!
//! Every process started here is killed when its guard drops, so a failing test
//! leaves nothing running.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A free loopback port (bound and released; racy in theory, fine on a test machine).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

/// A child process killed (SIGKILL) on drop.
pub struct ProcessGuard {
    pub child: Option<Child>,
    pub name: String,
}

impl ProcessGuard {
    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait up to `timeout` for a graceful exit; true if it exited by itself.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A weir server on a data directory and a fixed loopback port.
pub struct Server {
    pub data_dir: PathBuf,
    pub port: u16,
    pub process: ProcessGuard,
    pub log: PathBuf,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts a server and waits until it is ready.
    pub fn start(data_dir: &Path, port: u16, extra: &[&str]) -> Server {
        let log = data_dir.with_extension(format!("{port}.log"));
        let process = spawn_server(data_dir, port, extra, &log);
        let server = Server {
            data_dir: data_dir.to_path_buf(),
            port,
            process,
            log,
        };
        server.wait_ready(Duration::from_secs(60));
        server
    }

    pub fn restart(&mut self, extra: &[&str]) {
        self.process.kill();
        self.process = spawn_server(&self.data_dir, self.port, extra, &self.log);
        self.wait_ready(Duration::from_secs(60));
    }

    /// SIGTERM; panics with the end of the server's log unless it exits by
    /// itself within `timeout`.
    pub fn stop_gracefully(&mut self, timeout: Duration) {
        let pid = self.process.pid();
        if !self.process.terminate(timeout) {
            panic!(
                "server on port {} (pid {pid:?}) did not stop within {timeout:?} of SIGTERM; log tail:\n{}",
                self.port,
                self.log_tail(80)
            );
        }
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/readyz", self.url());
        while Instant::now() < deadline {
            if let Ok(response) = ureq_get(&url) {
                if response.0 == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!(
            "server on port {} not ready after {timeout:?}; log:\n{log}",
            self.port
        );
    }
}

fn spawn_server(data_dir: &Path, port: u16, extra: &[&str], log: &Path) -> ProcessGuard {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("opening the server log");
    let child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("server")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(extra)
        .env("WEIR_LOG", "info,weir_api=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("starting weir server");
    ProcessGuard {
        child: Some(child),
        name: format!("weir server :{port}"),
    }
}

/// Starts the example worker against `urls`.
pub fn start_worker(urls: &[String], extra: &[&str]) -> ProcessGuard {
    let child = Command::new(env!("CARGO_BIN_EXE_weir-example-worker"))
        .arg("--server")
        .arg(urls.join(","))
        .arg("--quiet")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the example worker");
    ProcessGuard {
        child: Some(child),
        name: "worker".into(),
    }
}

/// A minimal blocking HTTP/1.1 client over std, so tests need no runtime.
/// Returns (status, body as JSON or Null).
pub fn ureq_get(url: &str) -> Result<(u16, Value), String> {
    request("GET", url, None, "application/json")
}

pub fn post_json(url: &str, body: &Value) -> Result<(u16, Value), String> {
    request(
        "POST",
        url,
        Some(body.to_string().into_bytes()),
        "application/json",
    )
}

pub fn post_raw(url: &str, body: &[u8], content_type: &str) -> Result<(u16, Value), String> {
    request("POST", url, Some(body.to_vec()), content_type)
}

fn request(
    method: &str,
    url: &str,
    body: Option<Vec<u8>>,
    content_type: &str,
) -> Result<(u16, Value), String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").ok_or("only http URLs")?;
    let (host, path) = match rest.find('/') {
        Some(index) => (&rest[..index], &rest[index..]),
        None => (rest, "/"),
    };
    let mut stream = std::net::TcpStream::connect(host).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .map_err(|e| e.to_string())?;
    stream.write_all(&body).map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&response);
    let (head, payload) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    let payload = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(payload)
    } else {
        payload.to_string()
    };
    let value = serde_json::from_str(&payload).unwrap_or(Value::Null);
    Ok((status, value))
}

fn dechunk(mut text: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        text = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Retries `f` until it returns Some or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every instance with `status`, following cursors.
pub fn list_all(base: &str, status: &str) -> Result<Vec<Value>, String> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/instances?status={status}&limit=1000");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let (code, body) = ureq_get(&url)?;
        if code != 200 {
            return Err(format!("listing answered {code}: {body}"));
        }
        all.extend(body["instances"].as_array().cloned().unwrap_or_default());
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return Ok(all),
        }
    }
}

/// A small deterministic generator, so that a failing run can be replayed from its seed.
pub struct SplitMix(pub u64);

impl SplitMix {
    /// Seeded from `WEIR_TEST_SEED`, else the clock; the seed is printed.
    pub fn from_env() -> SplitMix {
        let seed = std::env::var("WEIR_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("the clock is after 1970")
                    .as_nanos() as u64
            });
        eprintln!("seed {seed} (set WEIR_TEST_SEED to replay)");
        SplitMix(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Which store a test's servers keep their state in.
#[derive(Debug, Clone, Copy)]
pub enum StoreKind {
    /// SQLite in the server's data directory (the default).
    Sqlite,
    /// A private PostgreSQL that the test starts (and stops when the store drops).
    Postgres,
}

/// A test's store: the server arguments that select it, and the PostgreSQL server
/// behind it, if any.
pub struct TestStore {
    _postgres: Option<weir_pgtest::PgServer>,
    args: Vec<String>,
}

impl TestStore {
    pub fn new(kind: StoreKind) -> TestStore {
        match kind {
            StoreKind::Sqlite => TestStore {
                _postgres: None,
                args: Vec::new(),
            },
            StoreKind::Postgres => {
                let server = weir_pgtest::PgServer::start();
                let url = server.create_database("weir");
                TestStore {
                    _postgres: Some(server),
                    args: vec!["--store".into(), url],
                }
            }
        }
    }

    /// The end of PostgreSQL's log (empty on SQLite), for failure messages.
    pub fn database_log_tail(&self) -> String {
        let log = self
            ._postgres
            .as_ref()
            .map(|pg| pg.log())
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The server arguments that select this store.
    pub fn args(&self) -> Vec<&str> {
        self.args.iter().map(String::as_str).collect()
    }
}
