//! Command-line options. The option names are a contract: scripts and tests outside this
//! repository start the daemon with exactly these names.

use std::path::PathBuf;

use clap::builder::PossibleValue;
use clap::{Args, Parser, Subcommand, ValueEnum};

pub use crate::config::SandboxMode;
pub use crate::image::CacheMode;

// The choices are domain types (`image`, `config`); here is only how they are spelled on the
// command line.
impl ValueEnum for CacheMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[CacheMode::None, CacheMode::Writeback]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            CacheMode::None => PossibleValue::new("none").help(
                "Bypass the host page cache (O_DIRECT) wherever the request's alignment allows it",
            ),
            CacheMode::Writeback => {
                PossibleValue::new("writeback").help("Go through the host page cache")
            }
        })
    }
}

impl ValueEnum for SandboxMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[SandboxMode::None, SandboxMode::Seccomp]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            SandboxMode::None => PossibleValue::new("none")
                .help("No seccomp filter (the rings are still restricted)"),
            SandboxMode::Seccomp => PossibleValue::new("seccomp").help(
                "Seccomp allowlists: a process-wide deny list, and a strict allowlist on worker \
                 threads",
            ),
        })
    }
}

/// A vhost-user-blk backend that serves one disk image from kernel-restricted io_uring rings.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "ringfence",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Options {
    /// Unix socket path to listen on for the VMM (created; must not be in use).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// An already-listening unix socket inherited from the parent (systemd socket activation,
    /// libvirt).
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,

    /// The disk image to serve (a regular file or a block device).
    #[arg(
        long,
        value_name = "IMAGE",
        required_unless_present = "print_capabilities"
    )]
    pub blk_file: Option<PathBuf>,

    /// Create the image as a sparse file of this size if it does not exist
    /// (bytes, or with a K/M/G/T suffix; a multiple of 512).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub create_size: Option<u64>,

    /// Export the disk read-only: writes, flushes, discards are refused and the rings
    /// allow READ_FIXED alone.
    #[arg(long)]
    pub read_only: bool,

    /// Number of virtqueues (one worker thread and one ring each).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Maximum virtqueue size (a power of two, 2..=1024).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Serial number reported by GET_ID (at most 20 bytes).
    #[arg(long, value_name = "STR", value_parser = parse_serial)]
    pub serial: Option<String>,

    /// Host cache mode (default: none where the image's filesystem supports O_DIRECT, else
    /// writeback, and the log says which).
    #[arg(long, value_enum)]
    pub cache: Option<CacheMode>,

    /// Sandbox for the process and its data-plane threads (default: the strictest that works).
    #[arg(long, value_enum)]
    pub sandbox: Option<SandboxMode>,

    /// Longest busy-poll window (microseconds) a worker spends looking for completions and
    /// new requests after a wakeup; adaptive, so an idle disk costs no CPU. 0 disables polling.
    #[arg(long, value_name = "US", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub poll_us: u64,

    /// Most SQEs a worker queues before it hands them to the kernel. Submitting the first
    /// requests of a large kick while the rest are still parsed keeps the disk busy and its
    /// completions spread out; pairs cost one io_uring_enter per two requests and measured
    /// best (see benches/README.md); 1 submits every request on its own.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub submit_batch: u32,

    /// Start as the destination of a live migration: the image (on storage shared with the
    /// source) is opened but not locked, so this daemon starts while the source's daemon still
    /// serves it; it is taken over when the VMM starts the device after the switchover (the
    /// source gives it up when its device stops), waiting up to --lock-wait.
    #[arg(long)]
    pub incoming: bool,

    /// How long (seconds) to wait for the image lock when another process holds it. A daemon
    /// restarted after a crash finds the lock held for a moment: the kernel releases the dead
    /// daemon's rings, and with them the image, only once their last I/O has completed.
    #[arg(long, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub lock_wait: u64,

    /// Largest guest RAM served, in all regions of a memory table (bytes, or with a K/M/G/T
    /// suffix). Guest RAM is pinned, so fully populated on the host, while it is served: a
    /// larger memory table is refused. Default: the host's RAM.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_guest_ram: Option<u64>,

    /// Permission bits of the sockets ringfence creates (--socket-path, --stats-socket), in
    /// octal (default 600: only the daemon's user may connect; 660 lets the socket's group in).
    #[arg(long, value_name = "MODE", default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Print the backend's capabilities as JSON (vhost-user backend program conventions) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Exit after the first VMM connection ends instead of waiting for the next one.
    #[arg(long)]
    pub once: bool,

    /// Serve statistics (Prometheus text format), the `resize` command and the I/O limits
    /// (`limits`) on this unix socket (see `ringfence stat`, `ringfence limits`).
    #[arg(long, value_name = "PATH")]
    pub stats_socket: Option<PathBuf>,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// I/O limits, spelled as QEMU's throttle options (`--iops-total 2000`, `--bps-read 20M`,
/// `--iops-total-max 4000 --iops-total-max-length 2`): on the daemon, and on `ringfence limits`
/// for a running one.
#[derive(Args, Debug, Clone, Default)]
pub struct LimitArgs {
    /// Limit the device to this many operations per second, reads and writes together. Shared by all queues; a request over
    /// the limit waits (never fails). FLUSH, DISCARD and WRITE_ZEROES count as one write of
    /// no bytes.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub iops_total: Option<String>,
    /// Burst rate above --iops-total, allowed for --iops-total-max-length.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub iops_total_max: Option<String>,
    /// How long (seconds, default 1) a burst at --iops-total-max may last.
    #[arg(
        long,
        value_name = "SECS",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub iops_total_max_length: Option<String>,
    /// Limit the device to this many operations per second, reads. Shared by all queues; a request over
    /// the limit waits (never fails). FLUSH, DISCARD and WRITE_ZEROES count as one write of
    /// no bytes.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub iops_read: Option<String>,
    /// Burst rate above --iops-read, allowed for --iops-read-max-length.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub iops_read_max: Option<String>,
    /// How long (seconds, default 1) a burst at --iops-read-max may last.
    #[arg(
        long,
        value_name = "SECS",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub iops_read_max_length: Option<String>,
    /// Limit the device to this many operations per second, writes. Shared by all queues; a request over
    /// the limit waits (never fails). FLUSH, DISCARD and WRITE_ZEROES count as one write of
    /// no bytes.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub iops_write: Option<String>,
    /// Burst rate above --iops-write, allowed for --iops-write-max-length.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub iops_write_max: Option<String>,
    /// How long (seconds, default 1) a burst at --iops-write-max may last.
    #[arg(
        long,
        value_name = "SECS",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub iops_write_max_length: Option<String>,
    /// Limit the device to this many bytes per second (K/M/G/T suffixes), reads and writes together. Shared by all queues; a request over
    /// the limit waits (never fails). FLUSH, DISCARD and WRITE_ZEROES count as one write of
    /// no bytes.
    #[arg(
        long,
        value_name = "BYTES",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub bps_total: Option<String>,
    /// Burst rate above --bps-total, allowed for --bps-total-max-length.
    #[arg(
        long,
        value_name = "BYTES",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub bps_total_max: Option<String>,
    /// How long (seconds, default 1) a burst at --bps-total-max may last.
    #[arg(
        long,
        value_name = "SECS",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub bps_total_max_length: Option<String>,
    /// Limit the device to this many bytes per second (K/M/G/T suffixes), reads. Shared by all queues; a request over
    /// the limit waits (never fails). FLUSH, DISCARD and WRITE_ZEROES count as one write of
    /// no bytes.
    #[arg(
        long,
        value_name = "BYTES",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub bps_read: Option<String>,
    /// Burst rate above --bps-read, allowed for --bps-read-max-length.
    #[arg(
        long,
        value_name = "BYTES",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub bps_read_max: Option<String>,
    /// How long (seconds, default 1) a burst at --bps-read-max may last.
    #[arg(
        long,
        value_name = "SECS",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub bps_read_max_length: Option<String>,
    /// Limit the device to this many bytes per second (K/M/G/T suffixes), writes. Shared by all queues; a request over
    /// the limit waits (never fails). FLUSH, DISCARD and WRITE_ZEROES count as one write of
    /// no bytes.
    #[arg(
        long,
        value_name = "BYTES",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub bps_write: Option<String>,
    /// Burst rate above --bps-write, allowed for --bps-write-max-length.
    #[arg(
        long,
        value_name = "BYTES",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub bps_write_max: Option<String>,
    /// How long (seconds, default 1) a burst at --bps-write-max may last.
    #[arg(
        long,
        value_name = "SECS",
        allow_negative_numbers = true,
        help_heading = "I/O limits (as QEMU's throttle options)"
    )]
    pub bps_write_max_length: Option<String>,
}

impl LimitArgs {
    /// `NAME=VALUE` words of the limits given, as `IoLimits::parse_words` reads them.
    pub fn words(&self) -> Vec<String> {
        let all = [
            (
                "iops-total",
                &self.iops_total,
                &self.iops_total_max,
                &self.iops_total_max_length,
            ),
            (
                "iops-read",
                &self.iops_read,
                &self.iops_read_max,
                &self.iops_read_max_length,
            ),
            (
                "iops-write",
                &self.iops_write,
                &self.iops_write_max,
                &self.iops_write_max_length,
            ),
            (
                "bps-total",
                &self.bps_total,
                &self.bps_total_max,
                &self.bps_total_max_length,
            ),
            (
                "bps-read",
                &self.bps_read,
                &self.bps_read_max,
                &self.bps_read_max_length,
            ),
            (
                "bps-write",
                &self.bps_write,
                &self.bps_write_max,
                &self.bps_write_max_length,
            ),
        ];
        let mut w = Vec::new();
        for (name, rate, max, len) in all {
            for (suffix, v) in [("", rate), ("-max", max), ("-max-length", len)] {
                if let Some(v) = v {
                    w.push(format!("{name}{suffix}={v}"));
                }
            }
        }
        w
    }

    /// The limits given, validated (none given: no limits).
    pub fn to_limits(&self) -> Result<crate::throttle::IoLimits, crate::throttle::LimitsError> {
        let words = self.words();
        crate::throttle::IoLimits::parse_words(words.iter().map(String::as_str))
    }
}

/// Commands that talk to a running daemon through its stats socket.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Print a running daemon's statistics as a table, with rates.
    Stat(StatOptions),
    /// Make a running daemon re-read its image's size and tell the guest (like SIGHUP).
    Resize(ResizeOptions),
    /// Print a running daemon's I/O limits, or replace them: the limits given become the
    /// daemon's only limits (as QEMU's block_set_io_throttle: a limit not given is removed);
    /// --none removes them all.
    Limits(Box<LimitsOptions>),
}

#[derive(Args, Debug, Clone)]
pub struct StatOptions {
    /// The daemon's --stats-socket.
    #[arg(long, value_name = "PATH")]
    pub stats_socket: PathBuf,

    /// Refresh every --interval: each table shows the rates over the last interval (the first,
    /// like the single table without --watch, the averages since the daemon started).
    #[arg(long)]
    pub watch: bool,

    /// Seconds between two tables with --watch.
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,

    /// With --watch: stop after this many tables.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct ResizeOptions {
    /// The daemon's --stats-socket.
    #[arg(long, value_name = "PATH")]
    pub stats_socket: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct LimitsOptions {
    /// The daemon's --stats-socket.
    #[arg(long, value_name = "PATH")]
    pub stats_socket: PathBuf,

    /// Remove every limit.
    #[arg(long, conflicts_with_all = [
        "iops_total", "iops_total_max", "iops_total_max_length",
        "iops_read", "iops_read_max", "iops_read_max_length",
        "iops_write", "iops_write_max", "iops_write_max_length",
        "bps_total", "bps_total_max", "bps_total_max_length",
        "bps_read", "bps_read_max", "bps_read_max_length",
        "bps_write", "bps_write_max", "bps_write_max_length",
    ])]
    pub none: bool,

    // The new limits. Given limits REPLACE all the daemon's limits: any limit not given here
    // is removed. None given (and no --none): print the limits.
    #[command(flatten)]
    pub limits: LimitArgs,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim(), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "'{s}' is not a permission mode in octal (000 to 777)"
        )),
    }
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' is not an interval between 0.1 and 3600 seconds"
        )),
    }
}

/// Parse a size with an optional binary suffix: `512`, `64M`, `10G`, `1T`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix '{c}' (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512, 64M, 10G)"))?;
    let bytes = n
        .checked_shl(shift)
        .filter(|b| b >> shift == n)
        .ok_or_else(|| format!("size '{s}' is too large"))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(format!(
            "size '{s}' must be a non-zero multiple of 512 bytes"
        ));
    }
    Ok(bytes)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a queue size"))?;
    if !(2..=1024).contains(&n) || !n.is_power_of_two() {
        return Err(format!(
            "queue size {n} must be a power of two between 2 and 1024"
        ));
    }
    Ok(n)
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > crate::config::SERIAL_LEN {
        return Err(format!(
            "serial '{s}' is {} bytes; at most {} are allowed",
            s.len(),
            crate::config::SERIAL_LEN
        ));
    }
    Ok(s.to_string())
}

/// The JSON printed by `--print-capabilities`, as QEMU's `docs/interop/vhost-user.json`
/// defines it for block backends (`VHostUserBackendCapabilities` with type `block`): the
/// optional options of the vhost-user-blk conventions that ringfence supports, `--read-only`
/// and `--blk-file`.
pub fn capabilities_json() -> &'static str {
    "{\n  \"type\": \"block\",\n  \"features\": [\n    \"read-only\",\n    \"blk-file\"\n  ]\n}"
}

#[cfg(test)]
mod tests;
