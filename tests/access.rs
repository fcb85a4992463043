//! Who may connect (issue 21, item 6). The vhost-user socket and the stats socket are created
//! with `--socket-mode` (default 600) whatever the umask, and the stats socket's `resize` is
//! accepted only from the daemon's own uid or root, while anyone who can connect may read the
//! statistics. The daemon runs under `umask 000` (the most open a parent can leave it), and a
//! second uid (nobody, through `setpriv`) uses the operator's own client, `ringfence`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const NOBODY: u32 = 65534;

/// A daemon started under `umask 000`, its sockets in a directory every user may traverse.
struct Served {
    proc: Proc,
    dir: tempfile::TempDir,
}

impl Served {
    fn start(extra: &[&str]) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        // Traversable by nobody, so that only the sockets' own modes decide.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let image = dir.path().join("disk.img");
        create_image(&image, 8 * MIB, None);
        let mut cmd = Command::new(ringfence_bin());
        cmd.arg("--socket-path")
            .arg(dir.path().join("vhost.sock"))
            .arg("--stats-socket")
            .arg(dir.path().join("stats.sock"))
            .arg("--blk-file")
            .arg(&image)
            .args(extra);
        // SAFETY: umask is async-signal-safe and touches nothing but the child's own mask.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
        Served {
            proc: Proc::spawn_until_ready(&mut cmd),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn image(&self) -> PathBuf {
        self.path("disk.img")
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `ringfence ARGS` as uid/gid `uid` (no supplementary groups), or as ourselves (root).
fn ringfence_as(uid: Option<u32>, args: &[&str]) -> Finished {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(ringfence_bin());
            c
        }
        None => Command::new(ringfence_bin()),
    };
    run_to_exit(cmd.args(args))
}

fn stats_arg(s: &Served) -> String {
    s.path("stats.sock").display().to_string()
}

#[test]
fn sockets_are_created_with_the_socket_mode_whatever_the_umask() {
    let default = Served::start(&[]);
    assert_eq!(
        mode(&default.path("vhost.sock")),
        0o600,
        "vhost-user socket"
    );
    assert_eq!(mode(&default.path("stats.sock")), 0o600, "stats socket");
    let group = Served::start(&["--socket-mode", "660"]);
    assert_eq!(mode(&group.path("vhost.sock")), 0o660, "vhost-user socket");
    assert_eq!(mode(&group.path("stats.sock")), 0o660, "stats socket");
    drop((default.proc, group.proc));
}

/// With the default mode, another uid cannot connect to either socket at all.
#[test]
fn another_uid_cannot_connect_to_the_default_sockets() {
    let s = Served::start(&[]);
    for sock in ["stats.sock", "vhost.sock"] {
        let path = s.path(sock).display().to_string();
        let out = ringfence_as(Some(NOBODY), &["stat", "--stats-socket", &path]);
        assert!(
            !out.status.success() && out.stderr.contains("ermission denied"),
            "{sock}: nobody must not connect: {:?}\n{}",
            out.status,
            out.stderr
        );
    }
    // The daemon's own user still can.
    let out = ringfence_as(None, &["stat", "--stats-socket", &stats_arg(&s)]);
    assert!(out.status.success(), "root's stat: {}", out.stderr);
}

/// With sockets everyone may connect to (`--socket-mode 666`), another uid reads the
/// statistics but its `resize` is refused, and the capacity stays; root's resize is served.
#[test]
fn only_the_daemons_uid_or_root_may_resize() {
    let s = Served::start(&["--socket-mode", "666"]);
    let stats = stats_arg(&s);
    let out = ringfence_as(Some(NOBODY), &["stat", "--stats-socket", &stats]);
    assert!(
        out.status.success() && out.stdout.contains("capacity 8.0 MiB"),
        "nobody may read the statistics: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    // The image grows on the host; nobody asks for the resize.
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.image())
        .and_then(|f| f.set_len(16 * MIB))
        .expect("grow the image");
    let out = ringfence_as(Some(NOBODY), &["resize", "--stats-socket", &stats]);
    assert!(
        !out.status.success() && out.stderr.contains("resize refused"),
        "nobody's resize must be refused: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let out = ringfence_as(None, &["stat", "--stats-socket", &stats]);
    assert!(
        out.stdout.contains("capacity 8.0 MiB") && out.stdout.contains("0 resize(s)"),
        "the capacity must stay after a refused resize:\n{}",
        out.stdout
    );
    assert!(
        s.proc.stderr().contains("refused to uid 65534"),
        "the refusal is logged:\n{}",
        s.proc.stderr()
    );
    // Root (the daemon's uid here) may.
    let out = ringfence_as(None, &["resize", "--stats-socket", &stats]);
    assert!(
        out.status.success() && out.stdout.contains("capacity 8388608 -> 16777216"),
        "root's resize: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
}
