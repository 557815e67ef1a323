//! Anomalies in the traffic itself, from the gateway's own view of its links.
//!
//! - [`FrameRate`] (`traffic`): a device whose frame rate over a window jumps far above its
//!   usual rate. Per device, on the gateway's clock; ends when the rate is back under twice
//!   the usual.
//! - [`Guard`] (`security`): a source address with a burst of failed Hellos or bad frames
//!   (token guessing, a broken firmware roll-out). Past the threshold the address is refused
//!   at connect (`LIMIT_EXCEEDED`) for a penalty that doubles while the bursts go on, and
//!   one `security` finding goes to the detector. Shared by every link task; a short mutex
//!   per failed link or new connection, never per frame.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;

use super::series::score;
use super::{Finding, Kind};

/// Frame-rate windows a device reports before its usual rate is trusted.
const WARMUP_WINDOWS: u32 = 6;

/// One device's frame rate.
#[derive(Debug, Clone, Default)]
pub struct FrameRate {
    window_start: i64,
    count: u32,
    windows: u32,
    /// Usual frames per window (exponentially weighted over normal windows).
    usual: f64,
    /// A `traffic` finding under way: the start of its first window.
    open: Option<i64>,
}

impl FrameRate {
    /// A frame arrived at `now`; closes windows of `window_ms` and judges them.
    pub fn frame(&mut self, now: i64, window_ms: i64, factor: f64, out: &mut Vec<Finding>) {
        if self.windows == 0 && self.count == 0 {
            self.window_start = now;
        }
        if now - self.window_start >= window_ms {
            // Idle windows in between count as empty.
            let idle = ((now - self.window_start) / window_ms - 1).clamp(0, 100) as u32;
            self.close(f64::from(self.count), window_ms, factor, out);
            for _ in 0..idle {
                self.close(0.0, window_ms, factor, out);
            }
            self.window_start += window_ms * (1 + i64::from(idle));
            if now - self.window_start >= window_ms {
                self.window_start = now;
            }
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
    }

    fn close(&mut self, n: f64, window_ms: i64, factor: f64, out: &mut Vec<Finding>) {
        let usual = self.usual.max(1.0);
        if let Some(from) = self.open {
            if n <= 2.0 * usual {
                self.open = None;
                out.push(Finding::end(Kind::Traffic, from, self.window_start - 1));
            }
            return; // a flood teaches nothing
        }
        if self.windows >= WARMUP_WINDOWS && n > factor * usual && n >= 10.0 {
            self.open = Some(self.window_start);
            out.push(Finding {
                ongoing: true,
                ..Finding::point(
                    Kind::Traffic,
                    "frame-rate",
                    score(n / usual, factor),
                    self.window_start,
                    self.window_start + window_ms,
                    n * 1000.0 / window_ms as f64,
                    format!(
                        "{:.1} frames/s, {:.0}× its usual {:.2}",
                        n * 1000.0 / window_ms as f64,
                        n / usual,
                        self.usual * 1000.0 / window_ms as f64
                    ),
                )
            });
            return;
        }
        self.windows = self.windows.saturating_add(1);
        let a = (1.0 / f64::from(self.windows)).max(0.1);
        self.usual += a * (n - self.usual);
    }
}

/// `[anomaly.security]` settings the guard applies.
#[derive(Debug, Clone, Copy)]
pub struct GuardPolicy {
    /// Failures from one address within `window` that make a burst.
    pub failures: u32,
    /// The window failures are counted over.
    pub window: Duration,
    /// First refusal period after a burst; doubles with each burst that follows, up to
    /// `max_penalty`.
    pub penalty: Duration,
    /// Longest refusal period.
    pub max_penalty: Duration,
}

/// A burst of failures from one address, for the detector.
#[derive(Debug, Clone)]
pub struct Burst {
    /// The source address.
    pub addr: IpAddr,
    /// Failures in the window.
    pub failures: u32,
    /// The device id the last failed Hello claimed, if any.
    pub device: Option<String>,
    /// The failures' error codes, most frequent first, e.g. "AUTH_FAILED×20".
    pub codes: String,
    /// First failure of the window, Unix ms.
    pub from_ms: i64,
    /// The decision, Unix ms.
    pub at_ms: i64,
    /// How long the address is refused from now.
    pub penalty: Duration,
}

#[derive(Debug, Default)]
struct Source {
    window_start: i64,
    failures: u32,
    codes: HashMap<&'static str, u32>,
    device: Option<String>,
    blocked_until: i64,
    strikes: u32,
}

/// Most addresses tracked; past it, the quietest are forgotten.
const MAX_SOURCES: usize = 10_000;

/// Failure counts per source address and the refusals they earn.
#[derive(Debug)]
pub struct Guard {
    policy: Option<GuardPolicy>,
    sources: Mutex<HashMap<IpAddr, Source>>,
    /// Where bursts go (bounded; a full queue drops the finding, the refusal still holds).
    bursts: mpsc::Sender<Burst>,
}

impl Guard {
    /// A guard applying `policy` (`None`: never refuses, never reports) and sending bursts
    /// to `bursts`.
    pub fn new(policy: Option<GuardPolicy>, bursts: mpsc::Sender<Burst>) -> Self {
        Self {
            policy,
            sources: Mutex::new(HashMap::new()),
            bursts,
        }
    }

    /// How much longer `addr` is refused at `now`, if it is.
    pub fn refused(&self, addr: IpAddr, now: i64) -> Option<Duration> {
        self.policy?;
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let until = sources.get(&addr)?.blocked_until;
        (until > now).then(|| Duration::from_millis((until - now) as u64))
    }

    /// A link from `addr` failed with `code` (its claimed device id, if it said Hello).
    /// Returns the penalty when this failure completes a burst.
    pub fn failure(
        &self,
        addr: IpAddr,
        code: &'static str,
        device: Option<&str>,
        now: i64,
    ) -> Option<Duration> {
        let policy = self.policy?;
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&addr) {
            let window = policy.window.as_millis() as i64;
            sources.retain(|_, s| s.blocked_until > now || now - s.window_start < window);
            if sources.len() >= MAX_SOURCES {
                return None; // under a flood of addresses: count, do not track
            }
        }
        let s = sources.entry(addr).or_default();
        let window = policy.window.as_millis() as i64;
        if s.failures == 0 || now - s.window_start > window {
            if now - s.window_start > 4 * window {
                s.strikes = 0; // quiet for a while: forgiven
            }
            s.window_start = now;
            s.failures = 0;
            s.codes.clear();
        }
        s.failures += 1;
        *s.codes.entry(code).or_default() += 1;
        if let Some(d) = device {
            s.device = Some(d.to_owned());
        }
        if s.failures < policy.failures {
            return None;
        }
        let factor = 1u32 << s.strikes.min(16);
        let penalty = (policy.penalty * factor).min(policy.max_penalty);
        s.strikes += 1;
        s.blocked_until = now + penalty.as_millis() as i64;
        let mut codes: Vec<_> = s.codes.iter().map(|(c, n)| (*n, *c)).collect();
        codes.sort_unstable_by(|a, b| b.cmp(a));
        let burst = Burst {
            addr,
            failures: s.failures,
            device: s.device.clone(),
            codes: codes
                .iter()
                .map(|(n, c)| format!("{c}×{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            from_ms: s.window_start,
            at_ms: now,
            penalty,
        };
        s.failures = 0;
        s.codes.clear();
        let _ = self.bursts.try_send(burst);
        Some(penalty)
    }
}

impl Burst {
    /// The burst as a `security` finding.
    pub fn finding(&self) -> Finding {
        Finding {
            value: None,
            to_ms: self.at_ms,
            ..Finding::point(
                Kind::Security,
                "failures",
                score(
                    f64::from(self.failures),
                    f64::from(self.failures.max(1)) / 2.0,
                ),
                self.from_ms,
                self.at_ms,
                0.0,
                format!(
                    "{} failed links from {} ({}); refused for {}",
                    self.failures,
                    self.addr,
                    self.codes,
                    humantime::format_duration(self.penalty)
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooding_device_is_traffic_until_it_calms_down() {
        let mut r = FrameRate::default();
        let mut out = Vec::new();
        let mut now = 0;
        for _ in 0..100 {
            now += 1000; // 1 frame/s
            r.frame(now, 10_000, 5.0, &mut out);
        }
        assert!(out.is_empty());
        for _ in 0..300 {
            now += 50; // 20 frames/s
            r.frame(now, 10_000, 5.0, &mut out);
        }
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!((out[0].kind, out[0].ongoing), (Kind::Traffic, true));
        for _ in 0..40 {
            now += 1000;
            r.frame(now, 10_000, 5.0, &mut out);
        }
        assert_eq!(out.len(), 2);
        assert!(out[1].is_end());
    }

    #[test]
    fn a_burst_of_failures_refuses_the_address_with_a_growing_penalty() {
        let (tx, mut rx) = mpsc::channel(8);
        let guard = Guard::new(
            Some(GuardPolicy {
                failures: 5,
                window: Duration::from_secs(60),
                penalty: Duration::from_secs(10),
                max_penalty: Duration::from_secs(600),
            }),
            tx,
        );
        let addr: IpAddr = "10.0.0.9".parse().unwrap();
        let other: IpAddr = "10.0.0.10".parse().unwrap();
        for i in 0..4 {
            assert_eq!(
                guard.failure(addr, "AUTH_FAILED", Some("pump-1"), 1000 + i),
                None
            );
        }
        assert_eq!(guard.refused(addr, 2000), None);
        assert_eq!(
            guard.failure(addr, "AUTH_FAILED", None, 2000),
            Some(Duration::from_secs(10))
        );
        assert_eq!(guard.refused(addr, 2000), Some(Duration::from_secs(10)));
        assert_eq!(guard.refused(other, 2000), None, "only that address");
        assert_eq!(guard.refused(addr, 12_001), None);
        let burst = rx.try_recv().unwrap();
        assert_eq!(
            (burst.failures, burst.device.as_deref()),
            (5, Some("pump-1"))
        );
        assert_eq!(burst.finding().kind, Kind::Security);
        for i in 0..5 {
            guard.failure(addr, "MALFORMED_MESSAGE", None, 13_000 + i);
        }
        assert_eq!(
            guard.refused(addr, 13_004),
            Some(Duration::from_millis(20_000))
        );
    }

    #[test]
    fn without_a_policy_nothing_is_refused() {
        let (tx, _rx) = mpsc::channel(1);
        let guard = Guard::new(None, tx);
        let addr: IpAddr = "10.0.0.9".parse().unwrap();
        for i in 0..1000 {
            assert_eq!(guard.failure(addr, "AUTH_FAILED", None, i), None);
        }
        assert_eq!(guard.refused(addr, 1000), None);
    }
}
