//! Limits on failed logins and bad tokens, per client address and per login role.
//!
//! Each key (an address, or a role) may fail a number of times within a window; beyond
//! that, its requests are answered 429 until the oldest failure leaves the window.
//! Successes do not count, so a well-behaved client elsewhere never notices an attacker.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many failures a key may have in a window.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub failures: u32,
    pub window: Duration,
}

/// Failure counts by key, in memory (a restart forgets them, which only helps clients).
#[derive(Debug)]
pub struct FailureLimiter {
    per_address: Limit,
    per_role: Limit,
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

impl FailureLimiter {
    pub fn new(per_address: Limit, per_role: Limit) -> Self {
        Self {
            per_address,
            per_role,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// How long the caller must wait, when `address` or `role` failed too often.
    pub fn blocked(&self, address: Option<&str>, role: Option<&str>) -> Option<Duration> {
        let now = Instant::now();
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());

        let mut wait: Option<Duration> = None;
        for (key, limit) in self.keys(address, role) {
            let Some(recent) = failures.get_mut(&key) else {
                continue;
            };
            recent.retain(|moment| now.duration_since(*moment) < limit.window);
            if recent.len() >= limit.failures as usize {
                let oldest = recent.first().copied().unwrap_or(now);
                let remaining = limit.window.saturating_sub(now.duration_since(oldest));
                wait = Some(wait.map_or(remaining, |wait| wait.max(remaining)));
            }
        }
        wait.map(|wait| wait.max(Duration::from_secs(1)))
    }

    /// Counts one failure against `address` and `role`.
    pub fn record_failure(&self, address: Option<&str>, role: Option<&str>) {
        let now = Instant::now();
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (key, _) in self.keys(address, role) {
            failures.entry(key).or_default().push(now);
        }

        // Keep memory bounded under a flood of distinct addresses.
        if failures.len() > 100_000 {
            let longest = self.per_address.window.max(self.per_role.window);
            failures.retain(|_, moments| {
                moments
                    .last()
                    .is_some_and(|last| now.duration_since(*last) < longest)
            });
        }
    }

    fn keys(&self, address: Option<&str>, role: Option<&str>) -> Vec<(String, Limit)> {
        let mut keys = Vec::with_capacity(2);
        if let Some(address) = address {
            keys.push((format!("address:{address}"), self.per_address));
        }
        if let Some(role) = role {
            keys.push((format!("role:{role}"), self.per_role));
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_failing_key_is_blocked() {
        let limit = Limit {
            failures: 3,
            window: Duration::from_secs(60),
        };
        let limiter = FailureLimiter::new(limit, limit);
        for _ in 0..3 {
            assert_eq!(limiter.blocked(Some("10.0.0.1"), None), None);
            limiter.record_failure(Some("10.0.0.1"), None);
        }
        assert!(limiter.blocked(Some("10.0.0.1"), None).is_some());
        assert_eq!(limiter.blocked(Some("10.0.0.2"), None), None);
    }

    #[test]
    fn a_role_under_attack_is_blocked_from_every_address() {
        let generous = Limit {
            failures: 100,
            window: Duration::from_secs(60),
        };
        let strict = Limit {
            failures: 2,
            window: Duration::from_secs(60),
        };
        let limiter = FailureLimiter::new(generous, strict);
        limiter.record_failure(Some("10.0.0.1"), Some("payments"));
        limiter.record_failure(Some("10.0.0.2"), Some("payments"));
        assert!(limiter
            .blocked(Some("10.0.0.3"), Some("payments"))
            .is_some());
        assert_eq!(limiter.blocked(Some("10.0.0.3"), Some("billing")), None);
    }
}
