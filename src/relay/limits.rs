//! Rate limiting state machines: a token bucket (relay bandwidth per node) and a fixed
//! window counter per IP address (registration rate). Time is passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A token bucket over bytes: `rate` bytes per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        // Integer refill: add whole bytes only, and advance `last` by exactly the time those
        // bytes account for, so no fraction is lost between calls.
        let add = (elapsed.as_nanos() * self.rate as u128 / 1_000_000_000) as u64;
        if add == 0 {
            if self.tokens >= self.burst {
                self.last = now;
            }
            return;
        }
        self.tokens = self.tokens.saturating_add(add);
        if self.tokens >= self.burst {
            self.tokens = self.burst;
            self.last = now;
        } else {
            let used =
                Duration::from_nanos((add as u128 * 1_000_000_000 / self.rate as u128) as u64);
            self.last += used;
        }
    }

    /// Takes `bytes` tokens if there are enough; `false` (nothing taken) otherwise.
    pub fn try_take(&mut self, now: Instant, bytes: u64) -> bool {
        self.refill(now);
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }

    /// Tokens available now.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.tokens
    }
}

/// Counts events per IP address in fixed windows; refuses once `max` per window is reached.
///
/// The unit per-IP limits count: an IPv4 address (IPv4-mapped IPv6 included), or an IPv6
/// /64. One IPv6 subscriber usually holds a whole /64 (RFC 6177 recommends at least that
/// per site), so counting single IPv6 addresses would let one host open unlimited sessions.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
    }
}

/// Memory is bounded by the number of distinct IPs seen within one window, and
/// [`RateWindows::prune`] forgets expired windows (the core calls it on its sweep).
#[derive(Debug)]
pub struct RateWindows {
    window: Duration,
    max: u32,
    max_tracked: usize,
    windows: HashMap<IpAddr, (Instant, u32)>,
}

impl RateWindows {
    /// At most `max` events per `window` per IP.
    pub fn new(window: Duration, max: u32) -> Self {
        RateWindows {
            window,
            max,
            max_tracked: usize::MAX,
            windows: HashMap::new(),
        }
    }

    /// Tracks at most `n` IPs at once: past that, events from IPs not already tracked are
    /// refused until [`RateWindows::prune`] frees room (bounds memory against floods from
    /// spoofed sources).
    pub fn with_max_tracked(mut self, n: usize) -> Self {
        self.max_tracked = n;
        self
    }

    /// Records one event from `ip`; `false` if over the limit (the event is not counted).
    pub fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self.windows.len() >= self.max_tracked && !self.windows.contains_key(&ip) {
            return false;
        }
        let entry = self.windows.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        if entry.1 >= self.max {
            return false;
        }
        entry.1 += 1;
        true
    }

    /// Forgets windows that have ended.
    pub fn prune(&mut self, now: Instant) {
        let window = self.window;
        self.windows
            .retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
    }

    /// IPs currently tracked.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no IP is tracked.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_rate_and_caps_at_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 500, t0);
        assert!(b.try_take(t0, 500));
        assert!(!b.try_take(t0, 1));
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.available(t1), 100);
        assert!(!b.try_take(t1, 101));
        assert!(b.try_take(t1, 100));
        // Many tiny steps lose nothing to rounding.
        let mut t = t1;
        for _ in 0..1000 {
            t += Duration::from_micros(100);
            b.available(t);
        }
        assert_eq!(b.available(t), 100);
        assert_eq!(b.available(t + Duration::from_secs(60)), 500);
    }

    #[test]
    fn windows_limit_per_ip_and_reset() {
        let t0 = Instant::now();
        let mut w = RateWindows::new(Duration::from_secs(60), 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let v6a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let v6c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(v6a), client_key(v6b));
        assert_ne!(client_key(v6a), client_key(v6c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_key(mapped), a);
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(w.allow(t0, a));
        assert!(w.allow(t0, a));
        assert!(!w.allow(t0, a));
        assert!(w.allow(t0, b));
        let t1 = t0 + Duration::from_secs(60);
        assert!(w.allow(t1, a));
        w.prune(t1 + Duration::from_secs(30));
        assert_eq!(w.len(), 1);
        // Bounded memory: a third IP is refused while two are tracked.
        let mut w = RateWindows::new(Duration::from_secs(1), 5).with_max_tracked(2);
        assert!(w.allow(t0, a) && w.allow(t0, b));
        assert!(!w.allow(t0, mapped_other()));
        assert!(w.allow(t0, a), "tracked IPs keep their own budget");
        w.prune(t0 + Duration::from_secs(1));
        assert!(w.allow(t0 + Duration::from_secs(1), mapped_other()));
    }

    fn mapped_other() -> IpAddr {
        "198.51.100.9".parse().unwrap()
    }
}
