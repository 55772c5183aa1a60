//! Hot reload of the rules file: on SIGHUP and when the file changes on disk.
//!
//! ```text
//! SIGHUP ─┐
//!         ├─▶ Reloader: read ▸ Rules::parse (every check of `cdc-invalidator check`)
//! poll ───┘        ├─ valid:   watch::Sender::send(Arc<Rules>) ──▶ Pipeline reads it once per batch
//!   (mtime, size,  └─ invalid: log every problem, keep the running rules,
//!    content)                 cdc_invalidator_rules_reload_failed = 1
//! ```
//!
//! The pipeline takes the current rules at the start of each batch, so a swap is atomic between
//! batches: every event of a batch is evaluated by one rules file, and an event is never
//! evaluated by half of an edit. A broken file never drops the running rules; the daemon keeps
//! them until a valid file appears (the next edit, or SIGHUP after a fix).
//!
//! Polling (no inotify crate): every [`POLL_INTERVAL`] the file's modification time and size are
//! compared with the last seen ones, and only then is the file read; its content is compared
//! too, so `touch` or a rewrite with the same text is not a reload. Editors that replace the
//! file (write a temporary file and rename it over) are seen like in-place writes, and so is a
//! Kubernetes ConfigMap update (its symlink swap changes what the path resolves to).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::{Rules, RulesError};
use crate::shutdown::Shutdown;
use crate::telemetry::events::rules::{RulesInForce, RulesReloadRejected, RulesReloaded};
use crate::telemetry::Metrics;

/// How often the rules file is looked at for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What made a reload happen, for the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    FileChanged,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChanged => "file changed",
        }
    }
}

/// The outcome of one reload attempt.
#[derive(Debug)]
pub enum Outcome {
    /// New rules are running.
    Swapped { hash: String, rules: usize },
    /// The file holds the rules already running: nothing to swap.
    Unchanged,
    /// The file is invalid or unreadable: the running rules stay. Every problem, in file order.
    Rejected(RulesError),
}

/// What the file looked like the last time it was examined.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    modified: Option<SystemTime>,
    len: u64,
}

/// Watches the rules file and publishes each valid new version.
pub struct Reloader {
    path: PathBuf,
    tx: watch::Sender<Arc<Rules>>,
    metrics: Arc<Metrics>,
    /// Hash of the running rules (the file text they were parsed from).
    running_hash: String,
    /// Content hash of the last text that failed, so a broken file is logged once per edit, not
    /// once per poll.
    failed_hash: Option<String>,
    seen: Option<Seen>,
    /// Installed as early as possible: until a handler exists, SIGHUP's default action would
    /// terminate the process (a `systemctl reload` during start-up).
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Reloader {
    /// Starts with `initial` (already loaded from `path`) running; the receiver is what the
    /// pipeline reads. Exports the running rules' hash and load time.
    pub fn new(path: &Path, initial: Arc<Rules>, metrics: Arc<Metrics>) -> (Reloader, watch::Receiver<Arc<Rules>>) {
        let running_hash = initial.hash();
        publish_metrics(&metrics, &initial, None);
        let (tx, rx) = watch::channel(initial);
        let reloader = Reloader {
            path: path.to_path_buf(),
            tx,
            metrics,
            running_hash,
            failed_hash: None,
            seen: stat(path),
            hangup: install_hangup(),
        };
        (reloader, rx)
    }

    /// Reads, validates and (when valid and different) swaps in the rules file now.
    pub fn reload(&mut self, trigger: Trigger) -> Outcome {
        self.seen = stat(&self.path);
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let err = RulesError::Invalid(vec![crate::config::Problem {
                    file: self.path.clone(),
                    location: None,
                    message: format!("cannot read the rules file: {e}"),
                }]);
                return self.reject(trigger, err, None);
            }
        };
        let rules = match Rules::parse(&text, &self.path) {
            Ok(r) => r,
            Err(err) => {
                let hash = content_hash(&text);
                return self.reject(trigger, err, Some(hash));
            }
        };
        self.failed_hash = None;
        self.metrics.rules_reload_failed.set(0);
        let hash = rules.hash();
        if hash == self.running_hash {
            tracing::info!(trigger = trigger.as_str(), hash = %hash, "rules reload: file unchanged, nothing to swap");
            return Outcome::Unchanged;
        }
        let count = rules.len();
        let rules = Arc::new(rules);
        // Receivers read the new value at their next batch; send_replace works with none left.
        // Sent before the metrics move, so whoever sees the new hash exported sees it in force.
        self.tx.send_replace(rules.clone());
        publish_metrics(&self.metrics, &rules, Some(&self.running_hash));
        let (trigger, previous) = (trigger.as_str(), &self.running_hash);
        self.metrics.emit(RulesReloaded { trigger, previous, hash: &hash, rules: count });
        self.running_hash = hash.clone();
        Outcome::Swapped { hash, rules: count }
    }

    fn reject(&mut self, trigger: Trigger, err: RulesError, content: Option<String>) -> Outcome {
        // A signal always logs (the operator asked); a poll logs a given broken text once.
        let repeat = trigger == Trigger::FileChanged && content.is_some() && content == self.failed_hash;
        self.metrics.emit(RulesReloadRejected {
            trigger: trigger.as_str(),
            file: &self.path,
            problems: err.problems(),
            running: &self.running_hash,
            log: !repeat,
        });
        self.failed_hash = content;
        Outcome::Rejected(err)
    }

    /// Whether the file's modification time or size differ from the last look.
    fn changed_on_disk(&self) -> bool {
        stat(&self.path) != self.seen
    }

    /// Reloads on SIGHUP and on every change seen by polling every `poll`, until shutdown stops
    /// intake.
    pub async fn run(mut self, poll: Duration, shutdown: Shutdown) {
        let mut hangup = self.hangup.take();
        let mut ticks = tokio::time::interval(poll);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.stopping() => return,
                Some(()) = recv_hangup(&mut hangup) => {
                    tracing::info!("SIGHUP: reloading the rules file");
                    self.reload(Trigger::Signal);
                }
                _ = ticks.tick() => {
                    if self.changed_on_disk() {
                        self.reload(Trigger::FileChanged);
                    }
                }
            }
        }
    }
}

/// The SIGHUP stream, when called inside a Tokio runtime (`None` elsewhere, e.g. plain tests).
fn install_hangup() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::runtime::Handle::try_current().ok()?;
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGHUP handler; rules reload on file changes only");
            None
        }
    }
}

async fn recv_hangup(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

fn stat(path: &Path) -> Option<Seen> {
    // `metadata` follows symlinks: a ConfigMap's `..data` swap shows as a new mtime.
    let m = std::fs::metadata(path).ok()?;
    Some(Seen { modified: m.modified().ok(), len: m.len() })
}

fn content_hash(text: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Exports the running rules: count, hash (the previous hash's series is removed) and load time.
fn publish_metrics(metrics: &Metrics, rules: &Rules, previous: Option<&str>) {
    metrics.emit(RulesInForce { rules: rules.len(), hash: &rules.hash(), previous });
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "version: 1\nrules:\n  - name: a\n    table: public.t\n    redis: { keys: [\"a:{id}\"] }\n";
    const TWO: &str = "version: 1\nrules:\n  - name: b\n    table: public.t\n    redis: { keys: [\"b:{id}\"] }\n  - name: c\n    table: public.u\n    redis: { keys: [\"c:{id}\"] }\n";
    const BROKEN: &str =
        "version: 1\nrules:\n  - name: a\n    table: public.t\n    redis: { keys: [\"a:{id\"] }\n    bogus: 1\n";

    fn setup() -> (tempfile::TempDir, PathBuf, Reloader, watch::Receiver<Arc<Rules>>, Arc<Metrics>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rules.yaml");
        std::fs::write(&path, ONE).expect("write");
        let metrics = Arc::new(Metrics::new());
        let rules = Arc::new(Rules::from_file(&path).expect("valid"));
        let (reloader, rx) = Reloader::new(&path, rules, metrics.clone());
        (dir, path, reloader, rx, metrics)
    }

    #[test]
    fn valid_change_swaps_and_exports_hash() {
        let (_dir, path, mut reloader, rx, metrics) = setup();
        let first = rx.borrow().hash();
        assert_eq!(metrics.value("cdc_invalidator_rules_info", &[("hash", &first)]), 1.0);
        std::fs::write(&path, TWO).expect("write");
        match reloader.reload(Trigger::FileChanged) {
            Outcome::Swapped { rules, .. } => assert_eq!(rules, 2),
            other => panic!("expected a swap, got {other:?}"),
        }
        let second = rx.borrow().hash();
        assert_ne!(first, second);
        assert_eq!(rx.borrow().names().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(metrics.value("cdc_invalidator_rules_info", &[("hash", &first)]), 0.0);
        assert_eq!(metrics.value("cdc_invalidator_rules_info", &[("hash", &second)]), 1.0);
        assert_eq!(metrics.value("cdc_invalidator_rules", &[]), 2.0);
        assert_eq!(metrics.value("cdc_invalidator_rules_reloads_total", &[("outcome", "ok")]), 1.0);
        assert!(metrics.value("cdc_invalidator_rules_loaded_timestamp_seconds", &[]) > 1.6e9);
    }

    #[test]
    fn broken_file_keeps_running_rules_and_sets_metric() {
        let (_dir, path, mut reloader, rx, metrics) = setup();
        let before = rx.borrow().hash();
        std::fs::write(&path, BROKEN).expect("write");
        match reloader.reload(Trigger::FileChanged) {
            Outcome::Rejected(e) => assert!(e.problems().len() >= 2, "every problem is reported: {e}"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(rx.borrow().hash(), before);
        assert!(!rx.has_changed().expect("sender alive"), "nothing was sent");
        assert_eq!(metrics.value("cdc_invalidator_rules_reload_failed", &[]), 1.0);
        assert_eq!(metrics.value("cdc_invalidator_rules_reloads_total", &[("outcome", "error")]), 1.0);
        // A missing file is rejected the same way.
        std::fs::remove_file(&path).expect("rm");
        assert!(matches!(reloader.reload(Trigger::Signal), Outcome::Rejected(_)));
        assert_eq!(rx.borrow().hash(), before);
        // The fix clears the failure flag.
        std::fs::write(&path, TWO).expect("write");
        assert!(matches!(reloader.reload(Trigger::Signal), Outcome::Swapped { .. }));
        assert_eq!(metrics.value("cdc_invalidator_rules_reload_failed", &[]), 0.0);
    }

    #[test]
    fn same_text_is_not_a_swap() {
        let (_dir, path, mut reloader, rx, _metrics) = setup();
        std::fs::write(&path, ONE).expect("write");
        assert!(matches!(reloader.reload(Trigger::Signal), Outcome::Unchanged));
        assert!(!rx.has_changed().expect("sender alive"));
    }

    #[tokio::test]
    async fn polling_picks_up_a_change() {
        let (_dir, path, reloader, mut rx, _metrics) = setup();
        let (trigger, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(reloader.run(Duration::from_millis(20), shutdown));
        // Different length, so the change is seen even where mtime has a coarse resolution.
        std::fs::write(&path, TWO).expect("write");
        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.expect("swapped in time").expect("sender");
        assert_eq!(rx.borrow().len(), 2);
        trigger.stop_intake();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("task");
    }
}
