//! Watches over behaviour across sessions: `[[alert]]` windows (rows of masked tables
//! read per login user per minute) and the brute-force guard (failed logins per client
//! address). Both are sliding windows of one-second buckets shared by every session.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::config::rules::{AlertAction, AlertRule};
use crate::config::AuthThrottleConfig;
use crate::identity::SessionIdentity;

const WINDOW_SECS: u64 = 60;

/// Counts in the last 60 seconds, one bucket per second.
#[derive(Debug)]
struct Window {
    buckets: [u64; WINDOW_SECS as usize],
    /// The second each bucket belongs to.
    stamps: [u64; WINDOW_SECS as usize],
    firing: bool,
}

impl Window {
    fn new() -> Window {
        Window {
            buckets: [0; WINDOW_SECS as usize],
            stamps: [u64::MAX; WINDOW_SECS as usize],
            firing: false,
        }
    }

    fn add(&mut self, second: u64, n: u64) {
        let i = (second % WINDOW_SECS) as usize;
        if self.stamps[i] != second {
            self.stamps[i] = second;
            self.buckets[i] = 0;
        }
        self.buckets[i] += n;
    }

    fn total(&self, second: u64) -> u64 {
        (0..WINDOW_SECS as usize)
            .filter(|&i| self.stamps[i] != u64::MAX && second - self.stamps[i] < WINDOW_SECS)
            .map(|i| self.buckets[i])
            .sum()
    }
}

/// Alert windows of every user, keyed by the rule's origin (stable across reloads).
pub struct Alerts {
    epoch: Instant,
    windows: DashMap<(String, String), Window>,
}

/// A threshold crossed just now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    pub rule: String,
    pub limit: u64,
    pub rows: u64,
    pub action: AlertAction,
}

impl Default for Alerts {
    fn default() -> Self {
        Alerts {
            epoch: Instant::now(),
            windows: DashMap::new(),
        }
    }
}

impl Alerts {
    fn second(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }
}

/// The alert rules that apply to one session's user.
#[derive(Clone)]
pub struct AlertWatch {
    alerts: Arc<Alerts>,
    /// Each applicable rule with its window's key (rule origin, login user), built once:
    /// the window is looked up for every statement of the session.
    rules: Vec<((String, String), AlertRule)>,
}

impl AlertWatch {
    /// `None` when no alert rule names any of the session's roles.
    pub fn for_session(
        alerts: &Arc<Alerts>,
        rules: &[AlertRule],
        identity: &SessionIdentity,
    ) -> Option<AlertWatch> {
        let rules: Vec<((String, String), AlertRule)> = rules
            .iter()
            .filter(|r| identity.has_any_role(&r.roles))
            .map(|r| ((r.origin.to_string(), identity.user.clone()), r.clone()))
            .collect();
        (!rules.is_empty()).then(|| AlertWatch {
            alerts: alerts.clone(),
            rules,
        })
    }

    /// Counts rows of masked tables the user read; returns the thresholds this crossed.
    pub fn read_rows(&self, rows: u64) -> Vec<Fired> {
        self.read_rows_at(rows, self.alerts.second())
    }

    fn read_rows_at(&self, rows: u64, second: u64) -> Vec<Fired> {
        let mut fired = Vec::new();
        for (key, rule) in &self.rules {
            let windows = &self.alerts.windows;
            let mut w = match windows.get_mut(key) {
                Some(w) => w,
                None => windows.entry(key.clone()).or_insert_with(Window::new),
            };
            w.add(second, rows);
            let total = w.total(second);
            if total > rule.max_rows_per_minute && !w.firing {
                w.firing = true;
                fired.push(Fired {
                    rule: key.0.clone(),
                    limit: rule.max_rows_per_minute,
                    rows: total,
                    action: rule.action,
                });
            } else if total <= rule.max_rows_per_minute {
                w.firing = false;
            }
        }
        fired
    }

    /// A `block` rule whose window is still over its limit: (rule origin, limit).
    pub fn blocked(&self) -> Option<(String, u64)> {
        self.blocked_at(self.alerts.second())
    }

    fn blocked_at(&self, second: u64) -> Option<(String, u64)> {
        self.rules
            .iter()
            .filter(|(_, r)| r.action == AlertAction::Block)
            .find_map(|(key, rule)| {
                let mut w = self.alerts.windows.get_mut(key)?;
                if w.total(second) > rule.max_rows_per_minute {
                    Some((key.0.clone(), rule.max_rows_per_minute))
                } else {
                    w.firing = false;
                    None
                }
            })
    }
}

/// Failed logins per client address; past the limit, the address is turned away.
pub struct AuthThrottle {
    config: AuthThrottleConfig,
    addresses: DashMap<IpAddr, Failures>,
}

#[derive(Default)]
struct Failures {
    recent: VecDeque<Instant>,
    banned_until: Option<Instant>,
}

impl AuthThrottle {
    pub fn new(config: AuthThrottleConfig) -> AuthThrottle {
        AuthThrottle {
            config,
            addresses: DashMap::new(),
        }
    }

    /// `Some(time left)` while `addr` is turned away.
    pub fn banned(&self, addr: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let until = self.addresses.get(&addr)?.banned_until?;
        (until > now).then(|| until - now)
    }

    /// Counts a failed login; `true` when this one starts a ban.
    pub fn failed(&self, addr: IpAddr) -> bool {
        if self.config.max_failures == 0 {
            return false;
        }
        let now = Instant::now();
        let mut f = self.addresses.entry(addr).or_default();
        while f
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.config.window)
        {
            f.recent.pop_front();
        }
        f.recent.push_back(now);
        if f.recent.len() >= self.config.max_failures as usize {
            f.recent.clear();
            f.banned_until = Some(now + self.config.ban);
            return true;
        }
        false
    }

    /// Forgets addresses with nothing recent (called now and then by the accept loop).
    pub fn prune(&self) {
        let now = Instant::now();
        self.addresses.retain(|_, f| {
            f.banned_until.is_some_and(|u| u > now)
                || f.recent
                    .back()
                    .is_some_and(|t| now.duration_since(*t) <= self.config.window)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::rules::Origin;

    fn rule(max: u64, action: AlertAction) -> AlertRule {
        AlertRule {
            roles: vec!["*".into()],
            max_rows_per_minute: max,
            action,
            origin: Origin {
                file: "r.toml".into(),
                line: 3,
            },
        }
    }

    #[test]
    fn window_fires_once_and_blocks_until_it_clears() {
        let alerts = Arc::new(Alerts::default());
        let id = SessionIdentity::offline("eve", &[], "");
        let w = AlertWatch::for_session(&alerts, &[rule(100, AlertAction::Block)], &id).unwrap();
        assert!(w.read_rows(60).is_empty());
        assert!(w.blocked().is_none());
        let fired = w.read_rows(60);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].rows, 120);
        assert!(w.read_rows(10).is_empty(), "fires once per crossing");
        assert_eq!(w.blocked(), Some(("r.toml:3".into(), 100)));
        // Once the rows leave the window, the block lifts and a new crossing fires again.
        let now = alerts.second();
        assert!(w.blocked_at(now + 61).is_none());
        assert!(w.read_rows_at(10, now + 61).is_empty());
        assert_eq!(w.read_rows_at(200, now + 62).len(), 1);
        // Another user has a window of their own.
        let other = SessionIdentity::offline("bob", &[], "");
        let b = AlertWatch::for_session(&alerts, &[rule(100, AlertAction::Block)], &other).unwrap();
        assert!(b.blocked().is_none());
    }

    #[test]
    fn old_buckets_leave_the_window() {
        let mut w = Window::new();
        w.add(10, 5);
        w.add(69, 7);
        assert_eq!(w.total(69), 12);
        assert_eq!(w.total(70), 7);
        w.add(70, 1);
        assert_eq!(w.total(70), 8);
    }

    #[test]
    fn throttle_bans_after_limit_within_window() {
        let t = AuthThrottle::new(AuthThrottleConfig {
            max_failures: 3,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(30),
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(!t.failed(a) && !t.failed(a));
        assert!(t.banned(a).is_none());
        assert!(t.failed(a));
        assert!(t.banned(a).is_some());
        assert!(t.banned("10.0.0.2".parse().unwrap()).is_none());
    }
}
