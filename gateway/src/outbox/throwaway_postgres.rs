//! A throwaway PostgreSQL cluster for tests: `initdb` into a new directory, a server on a free
//! loopback port, gone with the process that started it. From Debian's `postgresql` package
//! (`bash .ci/run` installs it when missing); `ECMO_PG_BINDIR` names another installation.
//!
//! PostgreSQL refuses to run as root: started by root, the cluster runs as the `postgres` user
//! the package creates.
//!
//! The server runs under a small shell that holds the read end of a pipe from this process:
//! when the process ends, however it ends, the pipe closes and the shell stops the server
//! (fast shutdown) and deletes the directory. Dropping the cluster does the same at once.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The role the tests connect as (trust authentication, loopback only).
pub const USER: &str = "gateway";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server installation found (initdb under /usr/lib/postgresql/*/bin or ECMO_PG_BINDIR): install Debian's postgresql package (bash .ci/run does)"
    )]
    NotInstalled,
    #[error("{0}: {1}")]
    Command(String, String),
    #[error("PostgreSQL did not accept connections within {0:?}")]
    NotReady(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A running throwaway server.
pub struct ThrowawayCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Closing it stops the server (see the module's doc).
    lifeline: Option<ChildStdin>,
    supervisor: Child,
    databases: AtomicU32,
    run_as_postgres: bool,
    /// Server settings beyond the port and socket (TLS), as `-c name=value` pairs.
    settings: Vec<String>,
}

impl ThrowawayCluster {
    /// Creates and starts a cluster; returns once it accepts connections.
    pub fn start() -> Result<Self, ClusterError> {
        Self::start_with(None, &[])
    }

    /// [`Self::start`] with `pg_stat_statements` loaded (from the server package's contrib
    /// modules), for the benchmark to say where the server's time went.
    pub fn start_profiled() -> Result<Self, ClusterError> {
        Self::start_with(None, &["shared_preload_libraries=pg_stat_statements"])
    }

    /// [`Self::start`], taking connections over TCP only with TLS, as the server
    /// `cert_pem` with `key_pem` (for 127.0.0.1).
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Result<Self, ClusterError> {
        Self::start_with(Some((cert_pem, key_pem)), &[])
    }

    fn start_with(tls: Option<(&str, &str)>, extra: &[&str]) -> Result<Self, ClusterError> {
        let bin = bindir().ok_or(ClusterError::NotInstalled)?;
        let run_as_postgres = std::fs::metadata("/proc/self")?.uid() == 0;
        let dir = std::env::temp_dir().join(format!(
            "ecmo-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir)?;
        if run_as_postgres {
            run(Command::new("chown").arg("postgres:").arg(&dir))?;
        }
        let data = dir.join("data");
        let mut initdb = command(run_as_postgres, &bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(&mut initdb)?;
        let mut settings = vec![
            "listen_addresses=127.0.0.1".to_owned(),
            "max_connections=200".to_owned(),
        ];
        settings.extend(extra.iter().map(|s| (*s).to_owned()));
        if let Some((cert_pem, key_pem)) = tls {
            let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::write(&cert, cert_pem)?;
            std::fs::write(&key, key_pem)?;
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if run_as_postgres {
                run(Command::new("chown").arg("postgres:").arg(&cert).arg(&key))?;
            }
            // Loopback TCP with TLS only: a plain connection is refused.
            let hba = data.join("pg_hba.conf");
            std::fs::write(
                &hba,
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )?;
            settings.extend([
                "ssl=on".to_owned(),
                format!("ssl_cert_file={}", cert.display()),
                format!("ssl_key_file={}", key.display()),
            ]);
        }
        let port = free_port()?;
        let mut supervisor = command(run_as_postgres, Path::new("sh"));
        supervisor
            .arg("-c")
            // Whichever server runs then (this one, or one started again after a crash) is
            // stopped through its data directory.
            .arg(
                r#"dir="$1"; pg_ctl="$2"; data="$3"; shift 3; "$@" & read -r _; "$pg_ctl" stop -D "$data" -m fast -w >/dev/null 2>&1; rm -rf "$dir""#,
            )
            .arg("sh")
            .arg(&dir)
            .arg(bin.join("pg_ctl"))
            .arg(&data)
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&dir)
            .args(settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log"))?);
        let mut supervisor = supervisor.spawn()?;
        let lifeline = supervisor.stdin.take();
        let cluster = Self {
            bin,
            dir,
            port,
            lifeline,
            supervisor,
            databases: AtomicU32::new(0),
            run_as_postgres,
            settings,
        };
        cluster.wait_ready()?;
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a new, empty database; its connection settings.
    pub fn database(&self) -> Result<tokio_postgres::Config, ClusterError> {
        let name = format!("db{}", self.databases.fetch_add(1, Ordering::Relaxed));
        let mut createdb = command(false, &self.bin.join("createdb"));
        createdb
            .arg("-h")
            .arg(&self.dir)
            .args(["-U", USER, "-p"])
            .arg(self.port.to_string())
            .arg(&name);
        run(&mut createdb)?;
        Ok(self.config(&name))
    }

    /// Connection settings for database `name`.
    pub fn config(&self, name: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(USER)
            .dbname(name);
        config
    }

    /// A `postgresql://` URL for database `name`, as the gateway's config takes it.
    pub fn url(&self, name: &str) -> String {
        format!("postgresql://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `sql` in database `name` with `psql` (over the socket); what it printed.
    pub fn psql(&self, name: &str, sql: &str) -> Result<String, ClusterError> {
        let output = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.dir)
            .args(["-U", USER, "-p"])
            .arg(self.port.to_string())
            .args(["-d", name, "-X", "-q", "-c", sql])
            .stdin(Stdio::null())
            .output()?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(ClusterError::Command(
                "psql".into(),
                String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            ))
        }
    }

    /// Stops the server at once, as a crash or a power cut would (`pg_ctl stop -m immediate`).
    pub fn crash(&self) -> Result<(), ClusterError> {
        let mut stop = command(self.run_as_postgres, &self.bin.join("pg_ctl"));
        stop.arg("stop")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w"]);
        run(&mut stop)
    }

    /// Starts the server again after [`Self::crash`], on the same port; returns once it accepts
    /// connections.
    pub fn restart(&self) -> Result<(), ClusterError> {
        let mut start = command(self.run_as_postgres, &self.bin.join("pg_ctl"));
        start
            .arg("start")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server-restarted.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} {}",
                self.port,
                self.dir.display(),
                self.settings
                    .iter()
                    .map(|s| format!("-c {s}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        run(&mut start)?;
        self.wait_ready()
    }

    fn wait_ready(&self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-U", USER, "-p"])
                .arg(self.port.to_string())
                .status()?;
            if ready.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::NotReady(START_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        if let Some(mut lifeline) = self.lifeline.take() {
            let _ = lifeline.write_all(b"\n");
        }
        let _ = self.supervisor.wait();
    }
}

/// One server for the unit tests of this process (each makes its own database on it).
#[cfg(test)]
pub(crate) fn shared_cluster() -> &'static ThrowawayCluster {
    static CLUSTER: std::sync::OnceLock<ThrowawayCluster> = std::sync::OnceLock::new();
    CLUSTER.get_or_init(|| ThrowawayCluster::start().expect("a throwaway PostgreSQL server"))
}

/// The newest installation's `bin` directory.
fn bindir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ECMO_PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// `program`, run as the `postgres` user when `as_postgres`.
fn command(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command) -> Result<(), ClusterError> {
    let output = command.stdin(Stdio::null()).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Command(
            format!("{command:?}"),
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

/// A loopback port nothing listens on now.
fn free_port() -> Result<u16, ClusterError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
