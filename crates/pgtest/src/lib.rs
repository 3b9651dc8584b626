//! A private PostgreSQL server for tests, started from the machine's Debian binaries.
//!
//! Each [`PgServer`] owns a fresh temporary directory (data directory, unix socket,
//! log) and listens on a free loopback port. Dropping it stops the server at once
//! and deletes the directory, so every test stops what it started.
//!
//! The cluster's default collation is linguistic (ICU's en-US, from PostgreSQL 15 on),
//! as on many production servers, so that a test catches code that silently relies on
//! byte order (e.g. `"B" < "a"`).
//!
//! The binaries come from `/usr/lib/postgresql/<version>/bin` (the highest version
//! installed). If there are none the harness panics: CI installs `postgresql`, so a
//! missing server must fail the tests, never skip them.
#![warn(missing_docs)]

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// Where Debian installs one directory per PostgreSQL major version.
const DEBIAN_POSTGRESQL_DIR: &str = "/usr/lib/postgresql";
/// The superuser initdb creates, and the OS user the server runs as when we are root.
const SUPERUSER: &str = "postgres";
/// First major version whose initdb can make ICU the default collation provider.
const ICU_DEFAULT_SINCE: u32 = 15;
/// Longest wait for the server to accept connections (or to stop), in seconds.
const READY_WAIT_SECS: u32 = 60;
/// Attempts at starting on a fresh port when the chosen one was taken meanwhile.
const PORT_ATTEMPTS_MAX: u32 = 3;
/// Connections the server accepts: several stores (each with its own pool) may
/// share one server in a test binary.
const CONNECTIONS_MAX: u32 = 300;
/// Longest database name PostgreSQL keeps (NAMEDATALEN - 1).
const DATABASE_NAME_MAX: usize = 63;

/// The server shared by the tests of one process that ask for it (see [`PgServer::shared`]).
static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
/// Numbers the databases [`PgServer::fresh_database`] creates.
static DATABASE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A running private PostgreSQL server.
pub struct PgServer {
    bin: PathBuf,
    major: u32,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    /// The OS user (uid, gid) the server runs as, when we are root (PostgreSQL refuses root).
    run_as: Option<(u32, u32)>,
    running: bool,
    /// Dropped last: deletes the data directory once the server has stopped.
    dir: tempfile::TempDir,
}

impl PgServer {
    /// Initialises a fresh cluster in a temporary directory and starts it on a free
    /// 127.0.0.1 port; returns once it accepts connections.
    ///
    /// # Panics
    ///
    /// When PostgreSQL is not installed, or initdb or the server fails (with its output).
    pub fn start() -> PgServer {
        let (major, bin) = bin_dir();
        let run_as = if is_root() {
            Some(postgres_user())
        } else {
            None
        };
        // As root the server runs as `postgres`, which must reach the directory: /tmp is
        // world-traversable, while a TMPDIR under root's home may not be.
        let builder = {
            let mut builder = tempfile::Builder::new();
            builder.prefix("weir-pg-");
            builder
        };
        let dir = if run_as.is_some() {
            builder.tempdir_in("/tmp")
        } else {
            builder.tempdir()
        }
        .unwrap_or_else(|err| panic!("creating a temporary directory for PostgreSQL: {err}"));
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .unwrap_or_else(|err| panic!("chown {} to postgres: {err}", dir.path().display()));
        }
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        let mut server = PgServer {
            bin,
            major,
            data,
            log,
            port: 0,
            run_as,
            running: false,
            dir,
        };
        server.initdb();
        let mut attempt = 1;
        loop {
            server.port = free_port();
            server.write_settings();
            match server.pg_ctl_start() {
                Ok(()) => break,
                Err(message)
                    if attempt < PORT_ATTEMPTS_MAX && message.contains("could not bind") =>
                {
                    attempt += 1;
                }
                Err(message) => panic!("{message}"),
            }
        }
        server
    }

    /// A server shared by every test of this process that asks for it while another
    /// still holds it; it stops when the last holder drops it. Create a database per
    /// test ([`PgServer::fresh_database`]) to keep tests apart.
    pub fn shared() -> Arc<PgServer> {
        let mut slot = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(server) = slot.upgrade() {
            return server;
        }
        let server = Arc::new(PgServer::start());
        *slot = Arc::downgrade(&server);
        server
    }

    /// The URL of database `db` as the superuser, over TCP.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `name` (lowercase letters, digits and `_`) and returns its URL.
    ///
    /// # Panics
    ///
    /// On a bad name or when the server refuses.
    pub fn create_database(&self, name: &str) -> String {
        let valid = !name.is_empty()
            && name.len() <= DATABASE_NAME_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        assert!(valid, "bad test database name `{name}`");
        let url = self.url(SUPERUSER);
        let statement = format!("CREATE DATABASE {name}");
        // The synchronous client runs its own tokio runtime, which must not be started
        // from an async test's thread: a thread of its own is safe from anywhere.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut client = postgres::Client::connect(&url, postgres::NoTls)
                        .unwrap_or_else(|err| panic!("connecting to {url}: {err}: {err:?}"));
                    client
                        .batch_execute(&statement)
                        .unwrap_or_else(|err| panic!("{statement}: {err:?}"));
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        });
        self.url(name)
    }

    /// Creates a database with a name unique in this process and returns its URL.
    pub fn fresh_database(&self) -> String {
        let number = DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.create_database(&format!("weir_test_{}_{number}", std::process::id()))
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`): the
    /// next start recovers from the write-ahead log. The directory is kept.
    ///
    /// # Panics
    ///
    /// When it is not running or does not stop.
    pub fn stop(&mut self) {
        assert!(self.running, "the server is not running");
        if let Err(message) = self.pg_ctl_stop() {
            panic!("{message}");
        }
    }

    /// Starts the server again after [`PgServer::stop`], on the same directory and port.
    ///
    /// # Panics
    ///
    /// When it is running, or does not start (e.g. another process took the port).
    pub fn start_again(&mut self) {
        assert!(!self.running, "the server is already running");
        if let Err(message) = self.pg_ctl_start() {
            panic!("{message}");
        }
    }

    /// The process id of the server (the postmaster).
    ///
    /// # Panics
    ///
    /// When it is not running.
    pub fn pid(&self) -> u32 {
        assert!(self.running, "the server is not running");
        let pid_file = self.data.join("postmaster.pid");
        let text = fs::read_to_string(&pid_file)
            .unwrap_or_else(|err| panic!("reading {}: {err}", pid_file.display()));
        text.lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {}", pid_file.display()))
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A command running `program` from the PostgreSQL binaries, as `postgres` when we are root.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            // Switching in the child directly (what runuser does) needs no extra tool;
            // std also drops root's supplementary groups when it sets the uid.
            command.uid(uid).gid(gid);
        }
        command.current_dir(self.dir.path());
        command
    }

    fn initdb(&self) {
        let mut command = self.command("initdb");
        command.arg("-D").arg(&self.data).args([
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if self.major >= ICU_DEFAULT_SINCE {
            command.args(["--locale-provider=icu", "--icu-locale=en-US"]);
        }
        let output = command
            // Syncing the fresh cluster's files only matters for an OS crash, which a
            // test never survives anyway; the server itself runs with fsync=on.
            .args(["--no-sync", "--no-instructions"])
            .output();
        check("initdb", output).unwrap_or_else(|message| panic!("{message}"));
    }

    /// Writes the settings of this run (port, sockets, durability) after initdb's defaults;
    /// the last occurrence of a setting wins.
    fn write_settings(&self) {
        let settings = format!(
            "\n# weir-pgtest\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{socket_dir}'\nfsync = on\nsynchronous_commit = on\n\
             max_connections = {CONNECTIONS_MAX}\n",
            port = self.port,
            socket_dir = self.dir.path().display(),
        );
        let conf = self.data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf)
            .unwrap_or_else(|err| panic!("reading {}: {err}", conf.display()));
        text.push_str(&settings);
        // Written as root into a directory owned by postgres: the file keeps its owner.
        fs::write(&conf, text).unwrap_or_else(|err| panic!("writing {}: {err}", conf.display()));
    }

    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let output = self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", &READY_WAIT_SECS.to_string(), "-s"])
            .output();
        match check("pg_ctl start", output) {
            Ok(()) => {
                self.running = true;
                Ok(())
            }
            Err(message) => Err(format!(
                "PostgreSQL did not start on port {} within {READY_WAIT_SECS} s: {message}\nserver log:\n{}",
                self.port,
                self.log()
            )),
        }
    }

    fn pg_ctl_stop(&mut self) -> Result<(), String> {
        let output = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args([
                "-m",
                "immediate",
                "-w",
                "-t",
                &READY_WAIT_SECS.to_string(),
                "-s",
            ])
            .output();
        check("pg_ctl stop", output)?;
        self.running = false;
        Ok(())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            if let Err(message) = self.pg_ctl_stop() {
                // Never panic in drop (it may run while a failed test unwinds); a server
                // that would not stop is killed so that it does not outlive the test.
                eprintln!("weir-pgtest: {message}");
                if let Ok(text) = fs::read_to_string(self.data.join("postmaster.pid")) {
                    if let Some(pid) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                        // SAFETY: kill has no memory effects; the pid is the postmaster's.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
        }
    }
}

/// The highest installed version's major number and binary directory.
fn bin_dir() -> (u32, PathBuf) {
    let missing = || -> ! {
        panic!(
            "PostgreSQL server binaries not found under {DEBIAN_POSTGRESQL_DIR}/*/bin: \
             install them with `apt-get update && apt-get install -y postgresql`"
        )
    };
    let Ok(entries) = fs::read_dir(DEBIAN_POSTGRESQL_DIR) else {
        missing()
    };
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            // "15", "16", or old "9.6": compare as numbers, not text ("9.6" < "15").
            let version = name
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            let complete = ["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|program| bin.join(program).is_file());
            complete.then_some((version, bin))
        })
        .max()
        .map(|(version, bin)| (version.first().copied().unwrap_or(0), bin))
        .unwrap_or_else(|| missing())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The `postgres` OS user's uid and gid (Debian's package creates it).
fn postgres_user() -> (u32, u32) {
    let name = c"postgres"; // SUPERUSER, as a C string
                            // SAFETY: getpwnam reads the user database and returns null or a pointer to a static
                            // record, which is read at once, before any other call could overwrite it.
    let ids = unsafe {
        let record = libc::getpwnam(name.as_ptr());
        if record.is_null() {
            None
        } else {
            Some(((*record).pw_uid, (*record).pw_gid))
        }
    };
    ids.unwrap_or_else(|| {
        panic!(
            "running as root, but there is no `{SUPERUSER}` user to run PostgreSQL as: \
             install it with `apt-get install -y postgresql`"
        )
    })
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|err| panic!("binding 127.0.0.1:0 to find a free port: {err}"));
    listener
        .local_addr()
        .unwrap_or_else(|err| panic!("reading the bound port: {err}"))
        .port()
}

/// Turns a finished command into `Err(what it printed)` unless it succeeded.
fn check(what: &str, output: std::io::Result<Output>) -> Result<(), String> {
    let output = output.map_err(|err| format!("running {what}: {err}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_creates_databases_restarts_and_cleans_up() {
        let mut server = PgServer::start();
        let dir = server.dir.path().to_path_buf();
        let url = server.fresh_database();
        let query = |url: &str| {
            let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
            let row = client.query_one("SHOW fsync", &[]).unwrap();
            row.get::<_, String>(0)
        };
        assert_eq!(query(&url), "on");
        let pid = server.pid();
        server.stop();
        assert!(postgres::Client::connect(&url, postgres::NoTls).is_err());
        server.start_again();
        assert_ne!(server.pid(), pid);
        assert_eq!(query(&url), "on", "the database survives a restart");
        drop(server);
        assert!(!dir.exists(), "the directory is deleted");
    }
}
