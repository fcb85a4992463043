//! The systemd units in `contrib/systemd/`, checked and run the way systemd runs them.
//!
//! - `systemd-analyze verify` accepts both units (every directive is known to systemd, the
//!   command exists).
//! - Socket activation through `systemd-socket-activate`: it creates the unit's `ListenStream=`
//!   socket, waits for the first connection and only then starts the service, handing the
//!   listening socket over as fd 3; the service runs the unit's own `ExecStart=` (with the
//!   paths moved into a temporary directory). A small shell loop between the two plays
//!   systemd's part across a restart: it keeps the listening socket open while ringfence is
//!   stopped and starts it again (Restart=). A VMM that connects while no ringfence runs is
//!   queued on the held socket and served by the next instance; a blkio client then reads back
//!   what it wrote before the restart.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

const INSTANCE: &str = "disk0";

fn contrib(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Values of `key=` in a unit file (last one wins in systemd; all are returned).
fn directive(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
        .collect()
}

/// A unit's text with the instance name and the machine paths replaced: `/var/lib/ringfence`
/// and `/run/ringfence` by directories of the test, the binary by the one cargo built.
fn localize(unit: &str, root: &Path) -> String {
    unit.replace("%i", INSTANCE)
        .replace(
            "/var/lib/ringfence",
            &root.join("lib").display().to_string(),
        )
        .replace("/run/ringfence", &root.join("run").display().to_string())
        .replace(
            "/usr/local/bin/ringfence",
            &ringfence_bin().display().to_string(),
        )
}

fn require(tool: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{tool} is missing: install the `systemd` package (scripts/test.sh and \
         guest-tests/qemu/install-host-packages.sh do)"
    );
}

#[test]
fn the_units_say_what_operators_need() {
    let socket = contrib("ringfence@.socket");
    let service = contrib("ringfence@.service");
    assert_eq!(
        directive(&socket, "ListenStream"),
        ["/run/ringfence/%i.sock"]
    );
    assert_eq!(directive(&socket, "Accept"), ["no"]);
    let exec = directive(&service, "ExecStart");
    assert_eq!(exec.len(), 1);
    assert!(exec[0].contains(" --fd 3 "), "{exec:?}");
    assert!(
        exec[0].contains("--stats-socket /run/ringfence/%i.stats"),
        "{exec:?}"
    );
    assert_eq!(directive(&service, "LimitMEMLOCK"), ["infinity"]);
    assert_eq!(directive(&service, "Restart"), ["on-failure"]);
    assert_eq!(
        directive(&service, "ExecReload"),
        ["/bin/kill -HUP $MAINPID"]
    );
    for hardening in [
        "NoNewPrivileges",
        "ProtectSystem",
        "CapabilityBoundingSet",
        "RestrictAddressFamilies",
        "MemoryDenyWriteExecute",
        "PrivateNetwork",
    ] {
        assert_eq!(directive(&service, hardening).len(), 1, "{hardening}");
    }
}

#[test]
fn systemd_analyze_verifies_the_units() {
    require("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (src, dst) in [
        ("ringfence@.socket", format!("ringfence@{INSTANCE}.socket")),
        (
            "ringfence@.service",
            format!("ringfence@{INSTANCE}.service"),
        ),
    ] {
        // systemd-analyze checks that ExecStart names an executable: the one cargo built.
        let text = contrib(src).replace(
            "/usr/local/bin/ringfence",
            &ringfence_bin().display().to_string(),
        );
        let p = dir.path().join(dst);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = run_to_exit(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(&paths)
            .env("SYSTEMD_LOG_LEVEL", "warning"),
    );
    // Warnings about the units themselves name them; the host's other units are not ours.
    let ours: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("ringfence@"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}\n{}",
        out.status,
        out.stderr
    );
}

/// `systemd-socket-activate` running the unit's command behind a restart loop.
struct Activated {
    child: Child,
    stderr: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Activated {
    /// Wait (bounded) for a stderr line containing `needle`.
    fn wait_line(&mut self, needle: &str) -> String {
        loop {
            match self.stderr.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no '{needle}' from systemd-socket-activate / ringfence; so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// The ringfence process the loop runs now (a child of the loop's shell, which is the
    /// process systemd-socket-activate became).
    fn ringfence_pid(&self) -> i32 {
        let kids = self.children();
        assert_eq!(kids.len(), 1, "the loop's children: {kids:?}");
        kids[0]
    }

    fn children(&self) -> Vec<i32> {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- systemd-socket-activate / ringfence ---\n{}",
                self.log.join("\n")
            );
        }
        // Whatever ringfence the loop runs (SIGTERM: it exits 0 promptly), then the loop.
        for pid in self.children() {
            // SAFETY: kill only signals a process this test started (a child of its loop).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            wait_pid_exit(pid, EXIT_TIMEOUT);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A VMM's connection (the `vhost` crate's frontend).
fn vmm(path: &Path) -> Frontend {
    Frontend::from_stream(
        UnixStream::connect(path).expect("connect to the unit's socket"),
        1,
    )
}

/// GET_FEATURES on `f`, bounded: the features the backend offers.
fn features(f: Frontend, what: &str) -> (Frontend, u64) {
    bounded(what, move || {
        let v = f.get_features().expect("GET_FEATURES");
        (f, v)
    })
}

#[test]
fn socket_activation_serves_a_vmm_across_a_restart() {
    require("systemd-socket-activate");
    let root = tempfile::tempdir().unwrap();
    let (lib, run) = (root.path().join("lib"), root.path().join("run"));
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let image = lib.join(format!("{INSTANCE}.img"));
    create_image(&image, 16 * MIB, None);

    let socket_unit = localize(&contrib("ringfence@.socket"), root.path());
    let service_unit = localize(&contrib("ringfence@.service"), root.path());
    let listen = PathBuf::from(&directive(&socket_unit, "ListenStream")[0]);
    // The unit's command line, as systemd splits it ($RINGFENCE_OPTS empty: no env file).
    let argv: Vec<String> = directive(&service_unit, "ExecStart")[0]
        .split_whitespace()
        .filter(|a| *a != "$RINGFENCE_OPTS")
        .map(String::from)
        .collect();
    let stats = PathBuf::from(&argv[argv.iter().position(|a| a == "--stats-socket").unwrap() + 1]);

    // Between two runs the loop waits for a line on this fifo: the test decides when the
    // "restart" ends, with the socket held meanwhile.
    let gate = root.path().join("gate");
    let rc = Command::new("mkfifo").arg(&gate).status().unwrap();
    assert!(rc.success());
    // What systemd would apply from the unit before starting the service.
    let umask = directive(&service_unit, "UMask")[0].clone();
    let memlock = match directive(&service_unit, "LimitMEMLOCK")[0].as_str() {
        "infinity" => "unlimited".to_string(),
        v => v.to_string(),
    };
    let script = r#"
        umask "$UMASK"
        ulimit -l "$MEMLOCK"
        for run in 1 2; do
            if [ "$run" != 1 ]; then read -r go < "$GATE"; fi
            "$@"
            echo "unit-test: ringfence run $run exited $?" >&2
        done"#;
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&listen)
        .arg("-E")
        .arg(format!("GATE={}", gate.display()))
        .args(["-E", "RUST_LOG=info"])
        .arg("-E")
        .arg(format!("UMASK={umask}"))
        .arg("-E")
        .arg(format!("MEMLOCK={memlock}"))
        .args(["--", "/bin/sh", "-c", script, "sh"])
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run systemd-socket-activate");
    let pipe = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut act = Activated {
        child,
        stderr: rx,
        log: Vec::new(),
    };
    act.wait_line("Listening on");
    // Nothing runs until the first connection (socket activation).
    assert!(
        std::fs::read_to_string(format!("/proc/{}/comm", act.child.id()))
            .unwrap()
            .starts_with("systemd-socket"),
        "the service started before anyone connected"
    );

    // First connection: activates ringfence (fd 3), which serves it. A VMM's handshake, with
    // timeouts (a service that never comes fails the test instead of hanging it).
    let (f, offered) = features(vmm(&listen), "GET_FEATURES to the activated service");
    assert_ne!(
        offered & (1 << 32),
        0,
        "VIRTIO_F_VERSION_1 offered: {offered:#x}"
    );
    act.wait_line("ready, listening on fd 3");
    drop(f);
    let mut c =
        Client::connect(&listen, ClientOpts::default()).expect("connect through the socket");
    assert_eq!(c.capacity(), 16 * MIB);
    let data = pattern(5, MIB, 64 * 1024);
    c.q().write(MIB, &data).unwrap();
    c.q().flush().unwrap();
    drop(c);
    let first = act.ringfence_pid();
    assert!(stats.exists(), "the unit's --stats-socket");

    // Restart: stop ringfence; the socket stays open in the loop (systemd's place).
    send_signal(first, libc::SIGTERM);
    assert!(wait_pid_exit(first, EXIT_TIMEOUT), "ringfence did not stop");
    act.wait_line("ringfence run 1 exited 0");
    // A VMM connects while no ringfence runs: the held socket queues it.
    let f = vmm(&listen);
    // Restart ends.
    File::options()
        .write(true)
        .open(&gate)
        .and_then(|mut g| g.write_all(b"go\n"))
        .unwrap();
    // The new ringfence answers the connection made before it existed.
    let (f, offered) = features(f, "GET_FEATURES to the restarted service");
    assert_ne!(
        offered & (1 << 32),
        0,
        "VIRTIO_F_VERSION_1 offered: {offered:#x}"
    );
    drop(f);
    let second = act.ringfence_pid();
    assert_ne!(first, second);

    // And a blkio client finds what it wrote before the restart.
    let mut c = Client::connect(&listen, ClientOpts::default()).expect("connect after restart");
    assert_same(
        "data written before the restart",
        MIB,
        &c.q().read(MIB, data.len()).unwrap(),
        &data,
    );
    drop(c);
    // The unit's stats socket: the second instance served that one read.
    let out = run_to_exit(
        Command::new(ringfence_bin())
            .arg("stat")
            .arg("--stats-socket")
            .arg(&stats),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let read = out
        .stdout
        .lines()
        .find(|l| l.starts_with("read "))
        .unwrap_or_default()
        .split_whitespace()
        .nth(3)
        .map(String::from);
    assert_eq!(read.as_deref(), Some("1"), "{}", out.stdout);
    // The unit's UMask: only the service's user may use the stats socket.
    let mode = std::fs::metadata(&stats).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o077, 0, "stats socket mode {mode:o}");
}
