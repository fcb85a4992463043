//! I/O limits: the operator caps a device's IOPS and bandwidth (total, read, write, each with
//! an optional burst, as QEMU's throttle options), shared by all its queues, changed live.
//!
//! Each limit is a virtual-scheduling bucket (GCRA): a theoretical arrival time that every
//! request moves on by its cost over the rate, and a tolerance (the bucket size over the rate)
//! by which a request may come earlier. A request is never failed or dropped: the worker asks
//! for a *reservation* and gets the time at which the request may start; until then the
//! request stays in the avail ring and the worker sleeps in epoll with that timeout (no
//! spinning, no timer fd). Reservations are taken in the order queues ask, and a queue holds
//! at most one (its next request), so no queue starves another.
//!
//! What counts: a read is a read of its bytes; a write a write of its bytes; FLUSH, DISCARD and
//! WRITE_ZEROES are one write operation each, of no bytes (they move no data: counting a
//! discard's sectors as bandwidth would stall a guest for trimming). GET_ID is not counted.
//! Every request counts towards the `total` limits too.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Highest rate accepted (per second): far above any disk, low enough that the arithmetic
/// stays exact.
pub const MAX_RATE: u64 = 1 << 40;
/// Lowest bandwidth limit accepted: a sector a second (anything lower holds one request for
/// longer than any guest waits).
pub const MIN_BPS: u64 = 512;
/// Longest burst accepted.
pub const MAX_BURST_LENGTH: Duration = Duration::from_secs(3600);
/// The bucket of a limit without a burst: a tenth of a second of its rate (as QEMU's).
const BASE_TOLERANCE: Duration = Duration::from_millis(100);

/// What a limit applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Total = 0,
    Read = 1,
    Write = 2,
}

const DIRS: [Dir; 3] = [Dir::Total, Dir::Read, Dir::Write];

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Total => "total",
            Dir::Read => "read",
            Dir::Write => "write",
        }
    }
}

/// One limit: an average rate per second, and optionally a higher burst rate allowed for
/// `max_length` (QEMU's `iops-total`, `iops-total-max`, `iops-total-max-length`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub rate: u64,
    pub max: Option<u64>,
    pub max_length: Duration,
}

impl Limit {
    pub fn new(rate: u64) -> Limit {
        Limit {
            rate,
            max: None,
            max_length: Duration::from_secs(1),
        }
    }
}

/// The limits of a device: IOPS and bytes per second, for total, read and write (indexed by
/// [`Dir`]). None everywhere: no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoLimits {
    pub iops: [Option<Limit>; 3],
    pub bps: [Option<Limit>; 3],
}

/// Why limits were refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LimitsError {
    #[error("{0}: must be a positive number")]
    Zero(String),
    #[error("{0}: above the largest limit accepted ({MAX_RATE})")]
    TooLarge(String, u64),
    #[error("{0}: {1} bytes per second is below the smallest limit accepted ({MIN_BPS})")]
    TooSmall(String, u64),
    #[error("{0}-max: the burst rate {1} must be above the rate {2}")]
    BurstBelowRate(String, u64, u64),
    #[error("{0}-max-length: must be between 1 and 3600 seconds")]
    BurstLength(String),
    #[error("{0}-max or {0}-max-length without {0}")]
    BurstWithoutRate(String),
    #[error("unknown limit '{0}' (known: iops-total, iops-read, iops-write, bps-total, bps-read, bps-write, each also with -max and -max-length)")]
    Unknown(String),
    #[error("{0}: '{1}' is not a number")]
    NotANumber(String, String),
}

impl IoLimits {
    pub fn is_empty(&self) -> bool {
        self.iops.iter().chain(&self.bps).all(Option::is_none)
    }

    /// Every limit with its QEMU name (`iops-total`, `bps-read`...).
    pub fn named(&self) -> impl Iterator<Item = (String, &Limit)> {
        let iops = DIRS
            .iter()
            .zip(&self.iops)
            .filter_map(|(d, l)| Some((format!("iops-{}", d.name()), l.as_ref()?)));
        let bps = DIRS
            .iter()
            .zip(&self.bps)
            .filter_map(|(d, l)| Some((format!("bps-{}", d.name()), l.as_ref()?)));
        iops.chain(bps)
    }

    /// Refuse zero, absurd and inconsistent limits.
    pub fn validate(&self) -> Result<(), LimitsError> {
        for (name, l) in self.named() {
            if l.rate == 0 {
                return Err(LimitsError::Zero(name));
            }
            if l.rate > MAX_RATE {
                return Err(LimitsError::TooLarge(name, l.rate));
            }
            if name.starts_with("bps") && l.rate < MIN_BPS {
                return Err(LimitsError::TooSmall(name, l.rate));
            }
            if let Some(max) = l.max {
                if max > MAX_RATE {
                    return Err(LimitsError::TooLarge(format!("{name}-max"), max));
                }
                if max <= l.rate {
                    return Err(LimitsError::BurstBelowRate(name, max, l.rate));
                }
            }
            if l.max_length.is_zero() || l.max_length > MAX_BURST_LENGTH {
                return Err(LimitsError::BurstLength(name));
            }
        }
        Ok(())
    }

    /// Parse `NAME=VALUE` words (QEMU's option names; sizes with K/M/G/T suffixes for the
    /// `bps` limits, seconds for `-max-length`), as the stats socket's `limits` command carries
    /// them. No words: no limits. The result is validated.
    pub fn parse_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<Self, LimitsError> {
        let mut rates: Vec<(String, u64)> = Vec::new();
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| LimitsError::Unknown(w.chars().take(40).collect()))?;
            let n = match parse_number(v) {
                Some(n) => n,
                None if v.trim().starts_with('-') => return Err(LimitsError::Zero(k.into())),
                None if v.trim().chars().next().is_some_and(|c| c.is_ascii_digit()) => {
                    return Err(LimitsError::TooLarge(k.into(), u64::MAX))
                }
                None => return Err(LimitsError::NotANumber(k.into(), v.into())),
            };
            rates.push((k.to_string(), n));
        }
        let mut out = IoLimits::default();
        for (kind, slots) in [("iops", &mut out.iops), ("bps", &mut out.bps)] {
            for d in DIRS {
                let base = format!("{kind}-{}", d.name());
                let get = |suffix: &str| {
                    let key = format!("{base}{suffix}");
                    rates.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v)
                };
                let (rate, max, len) = (get(""), get("-max"), get("-max-length"));
                slots[d as usize] = match rate {
                    Some(rate) => Some(Limit {
                        rate,
                        max,
                        max_length: Duration::from_secs(len.unwrap_or(1)),
                    }),
                    None if max.is_some() || len.is_some() => {
                        return Err(LimitsError::BurstWithoutRate(base))
                    }
                    None => None,
                };
            }
        }
        for (k, _) in &rates {
            let known = ["iops", "bps"].iter().any(|kind| {
                DIRS.iter().any(|d| {
                    let base = format!("{kind}-{}", d.name());
                    [String::new(), "-max".into(), "-max-length".into()]
                        .iter()
                        .any(|s| *k == format!("{base}{s}"))
                })
            });
            if !known {
                return Err(LimitsError::Unknown(k.chars().take(40).collect()));
            }
        }
        out.validate()?;
        Ok(out)
    }

    /// The words [`IoLimits::parse_words`] reads back.
    pub fn to_words(&self) -> Vec<String> {
        let mut w = Vec::new();
        for (name, l) in self.named() {
            w.push(format!("{name}={}", l.rate));
            if let Some(max) = l.max {
                w.push(format!("{name}-max={max}"));
                w.push(format!("{name}-max-length={}", l.max_length.as_secs()));
            }
        }
        w
    }
}

impl fmt::Display for IoLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&self.to_words().join(" "))
    }
}

/// A decimal number, with an optional K/M/G/T (binary) suffix.
fn parse_number(v: &str) -> Option<u64> {
    let v = v.trim();
    let (digits, shift) = match v.chars().last()?.to_ascii_uppercase() {
        'K' => (&v[..v.len() - 1], 10),
        'M' => (&v[..v.len() - 1], 20),
        'G' => (&v[..v.len() - 1], 30),
        'T' => (&v[..v.len() - 1], 40),
        _ => (v, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// One virtual-scheduling bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    rate: f64,
    tolerance: Duration,
    tat: Instant,
}

impl Bucket {
    fn new(rate: u64, tolerance: Duration, now: Instant) -> Bucket {
        Bucket {
            rate: rate as f64,
            tolerance,
            tat: now,
        }
    }

    /// When a request arriving at `now` may start.
    fn ready(&self, now: Instant) -> Instant {
        let tat = self.tat.max(now);
        tat.checked_sub(self.tolerance).unwrap_or(now).max(now)
    }

    /// Account a request of `cost` units started at `start`.
    fn take(&mut self, cost: u64, start: Instant) {
        let step = Duration::from_secs_f64(cost as f64 / self.rate);
        let from = self.tat.max(start);
        // Saturates far beyond any wait that matters: never an overflow.
        self.tat = from.checked_add(step).unwrap_or(from);
    }
}

/// The buckets of one limit: the average rate's, and the burst rate's when there is one.
#[derive(Clone, Debug)]
struct Buckets {
    avg: Bucket,
    burst: Option<Bucket>,
}

impl Buckets {
    fn new(l: &Limit, now: Instant) -> Buckets {
        // A burst lets `max - rate` units more through per second for `max_length`: that many
        // units of tolerance on the average bucket, the burst rate its own bucket.
        let tolerance = match l.max {
            Some(max) => BASE_TOLERANCE.max(Duration::from_secs_f64(
                (max - l.rate) as f64 * l.max_length.as_secs_f64() / l.rate as f64,
            )),
            None => BASE_TOLERANCE,
        };
        Buckets {
            avg: Bucket::new(l.rate, tolerance, now),
            burst: l.max.map(|m| Bucket::new(m, BASE_TOLERANCE, now)),
        }
    }

    fn all(&mut self) -> impl Iterator<Item = &mut Bucket> {
        std::iter::once(&mut self.avg).chain(self.burst.as_mut())
    }
}

struct State {
    limits: IoLimits,
    iops: [Option<Buckets>; 3],
    bps: [Option<Buckets>; 3],
}

impl State {
    fn buckets(&mut self, is_bps: bool, d: Dir) -> Option<&mut Buckets> {
        let set = if is_bps {
            &mut self.bps
        } else {
            &mut self.iops
        };
        set[d as usize].as_mut()
    }

    fn new(limits: IoLimits, now: Instant) -> State {
        let make = |l: &Option<Limit>| l.as_ref().map(|l| Buckets::new(l, now));
        State {
            iops: [
                make(&limits.iops[0]),
                make(&limits.iops[1]),
                make(&limits.iops[2]),
            ],
            bps: [
                make(&limits.bps[0]),
                make(&limits.bps[1]),
                make(&limits.bps[2]),
            ],
            limits,
        }
    }
}

/// A device's limits and their buckets, shared by its queues for the life of the process.
pub struct Throttle {
    /// Whether any limit is set: the data path's one branch.
    active: AtomicBool,
    /// Moved on by every change: reservations made before it are taken again.
    generation: AtomicU64,
    state: Mutex<State>,
    /// Requests that waited, and for how long in all (nanoseconds).
    waited: AtomicU64,
    waited_ns: AtomicU64,
}

/// When a request may start, under the limits of a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub ready: Instant,
    pub generation: u64,
}

impl Throttle {
    /// A throttle with `limits` (validated by the caller).
    pub fn new(limits: IoLimits) -> Throttle {
        Throttle {
            active: AtomicBool::new(!limits.is_empty()),
            generation: AtomicU64::new(0),
            state: Mutex::new(State::new(limits, Instant::now())),
            waited: AtomicU64::new(0),
            waited_ns: AtomicU64::new(0),
        }
    }

    /// Whether requests must ask for a reservation.
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reserve a request of `bytes` in direction `dir` (never `Dir::Total`: every request
    /// counts towards the total limits as well) arriving at `now`.
    pub fn reserve(&self, dir: Dir, bytes: u64, now: Instant) -> Reservation {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.generation();
        // (IOPS or bytes, which direction, cost): one operation, and its bytes if it has any.
        let mut costs = vec![(false, Dir::Total, 1), (true, Dir::Total, bytes)];
        if dir != Dir::Total {
            costs.extend([(false, dir, 1), (true, dir, bytes)]);
        }
        costs.retain(|&(_, _, cost)| cost > 0);
        let mut ready = now;
        for &(is_bps, d, _) in &costs {
            if let Some(b) = st.buckets(is_bps, d) {
                ready = ready.max(b.all().map(|x| x.ready(now)).fold(now, Instant::max));
            }
        }
        for &(is_bps, d, cost) in &costs {
            if let Some(b) = st.buckets(is_bps, d) {
                b.all().for_each(|x| x.take(cost, ready));
            }
        }
        Reservation { ready, generation }
    }

    /// Replace every limit (validated first: a refused set leaves the running one). Buckets
    /// start full; reservations made under the old limits are taken again.
    pub fn set(&self, limits: IoLimits) -> Result<(), LimitsError> {
        limits.validate()?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.active.store(!limits.is_empty(), Ordering::Relaxed);
        *st = State::new(limits, Instant::now());
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    pub fn limits(&self) -> IoLimits {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .limits
            .clone()
    }

    /// A request started after waiting `d` for its reservation.
    pub fn count_wait(&self, d: Duration) {
        self.waited.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.waited_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// (requests that waited, seconds they waited in all).
    pub fn waits(&self) -> (u64, f64) {
        (
            self.waited.load(Ordering::Relaxed),
            self.waited_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }
}

#[cfg(test)]
mod tests;
