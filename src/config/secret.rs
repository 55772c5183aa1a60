//! Secrets: one type for a secret value, one convention for where it comes from, and one way to
//! read it again. A leaf (like [`super::duration`]): it uses nothing else of `config`, so a
//! component (the CDN sinks) can use it while `config` embeds the component's own config type,
//! without an import cycle between `config` and the component.
//!
//! # The convention
//!
//! A secret setting `<name>` is given as `<name>_env` (the name of an environment variable that
//! holds it) or `<name>_file` (a file that holds it, relative to the config file; a trailing
//! newline is dropped), never both ([`SecretRef`]). Credentials of providers (CDN tokens, AWS
//! keys, EdgeGrid secrets) are only ever given that way; the few settings that are not only a
//! credential (a Redis or PostgreSQL URL, the schema registry password) also take the value
//! inline, and then exactly one of the three is set. librdkafka's passthrough settings follow
//! the same rule key by key (`sasl.password_file`). Every value read is registered with
//! [`crate::redact`], so no output shows it.
//!
//! # Reading again
//!
//! A [`RotatingSecret`] is a secret that may change while the daemon runs (a Kubernetes secret
//! volume, a Vault agent rewriting a file): it notices a changed file on use (one `stat` per
//! [`CHECK_EVERY`] at most, a read only when the file changed), and [`Reload::reload`] reads it
//! at once, which the HTTP purge path does when a provider answers 401/403 before it treats the
//! refusal as permanent (`crate::sink::cdn::http::Sender`). A variable does not change under a
//! running process, so a secret from `_env` is read once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::Deserialize;

/// A secret string: not `Serialize`, and `Debug` never shows it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret value; registered with [`crate::redact`] so no output ever shows it.
    pub fn new(s: impl Into<String>) -> Secret {
        let s = s.into();
        crate::redact::register(&s);
        Secret(s)
    }

    /// A value kept like a secret but not hidden from outputs: a librdkafka setting that is not
    /// one (`security.protocol: SASL_SSL`), whose text errors may quote usefully.
    pub fn plain(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A path relative to the config file's folder (absolute paths stay as they are).
pub fn relative_to(config_file: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    config_file.parent().map(|d| d.join(p)).unwrap_or_else(|| p.to_path_buf())
}

/// Whether a secret setting must be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Required,
    Optional,
}

/// Where one secret setting says its value is: the settings `<name>` (where inline values are
/// allowed), `<name>_env` and `<name>_file`.
#[derive(Debug, Clone, Default)]
pub struct SecretRef {
    /// `Some` only for settings that accept the value inline ([`SecretRef::with_inline`]).
    inline: Option<Option<Secret>>,
    pub env: Option<String>,
    pub file: Option<PathBuf>,
}

/// Why a secret setting could not be read: the key to point at, as the file spells it
/// (`token_env`; `None` for the entry holding the setting), and a sentence that names the
/// variable or the file but never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretProblem {
    pub key: Option<String>,
    pub message: String,
}

impl SecretProblem {
    fn at(key: Option<String>, message: String) -> SecretProblem {
        SecretProblem { key, message }
    }
}

impl SecretRef {
    /// The pair of settings `<name>_env` and `<name>_file` (no inline value).
    pub fn of(env: &Option<String>, file: &Option<PathBuf>) -> SecretRef {
        SecretRef { inline: None, env: env.clone(), file: file.clone() }
    }

    /// A setting that also accepts its value inline (`url: redis://...`).
    pub fn with_inline(mut self, inline: Option<&Secret>) -> SecretRef {
        self.inline = Some(inline.cloned());
        self
    }

    /// Whether any of the settings is given.
    pub fn is_given(&self) -> bool {
        self.env.is_some() || self.file.is_some() || self.inline.as_ref().is_some_and(Option::is_some)
    }

    /// Reads the secret once. `name` is the base name (`token`) for messages.
    pub fn resolve(&self, name: &str, need: Need, config_file: &Path) -> Result<Option<Secret>, SecretProblem> {
        let Some(from) = self.locate(name, need, config_file)? else { return Ok(None) };
        from.read(name).map(Some)
    }

    /// Reads the secret and keeps where it came from, so it can be read again.
    pub fn resolve_rotating(
        &self,
        name: &str,
        need: Need,
        config_file: &Path,
    ) -> Result<Option<Arc<RotatingSecret>>, SecretProblem> {
        let Some(from) = self.locate(name, need, config_file)? else { return Ok(None) };
        let value = from.read(name)?;
        Ok(Some(Arc::new(RotatingSecret::from_parts(name, from, value))))
    }

    /// [`SecretRef::resolve`] reported the way the config loader and the CDN sinks collect
    /// problems: (path below the entry, sentence).
    pub fn resolve_into(
        &self,
        name: &str,
        need: Need,
        config_file: &Path,
        problems: &mut Vec<(Vec<String>, String)>,
    ) -> Option<Secret> {
        self.resolve(name, need, config_file).unwrap_or_else(|p| {
            problems.push((p.key.into_iter().collect(), p.message));
            None
        })
    }

    /// [`SecretRef::resolve_rotating`], reported like [`SecretRef::resolve_into`].
    pub fn resolve_rotating_into(
        &self,
        name: &str,
        need: Need,
        config_file: &Path,
        problems: &mut Vec<(Vec<String>, String)>,
    ) -> Option<Arc<RotatingSecret>> {
        self.resolve_rotating(name, need, config_file).unwrap_or_else(|p| {
            problems.push((p.key.into_iter().collect(), p.message));
            None
        })
    }

    /// Which one setting holds the value; `None` when none is given and none is needed.
    fn locate(&self, name: &str, need: Need, config_file: &Path) -> Result<Option<Place>, SecretProblem> {
        let (env, file) = (self.env.as_ref(), self.file.as_ref());
        match &self.inline {
            Some(inline) => {
                let given = inline.is_some() as u8 + env.is_some() as u8 + file.is_some() as u8;
                if given > 1 || (given == 0 && need == Need::Required) {
                    return Err(SecretProblem::at(
                        None,
                        format!("exactly one of `{name}`, `{name}_env` and `{name}_file` must be set (found {given})"),
                    ));
                }
                if let Some(v) = inline {
                    return Ok(Some(Place::Inline(v.clone())));
                }
            }
            None => match (env, file) {
                (Some(_), Some(_)) => {
                    return Err(SecretProblem::at(
                        Some(format!("{name}_env")),
                        format!("set `{name}_env` or `{name}_file`, not both"),
                    ))
                }
                (None, None) if need == Need::Required => {
                    return Err(SecretProblem::at(
                        None,
                        format!("`{name}_env` or `{name}_file` is required (credentials are never written inline)"),
                    ))
                }
                _ => {}
            },
        }
        Ok(match (env, file) {
            (Some(var), _) => Some(Place::Env(var.clone())),
            (None, Some(f)) => Some(Place::File(relative_to(config_file, f))),
            (None, None) => None,
        })
    }
}

/// The one setting a secret was read from.
#[derive(Debug, Clone)]
enum Place {
    Inline(Secret),
    Env(String),
    File(PathBuf),
}

impl Place {
    fn read(&self, name: &str) -> Result<Secret, SecretProblem> {
        match self {
            Place::Inline(v) => {
                // Deserialized as is, so not registered yet.
                crate::redact::register(v.expose());
                Ok(v.clone())
            }
            Place::Env(var) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Ok(Secret::new(v.trim_end_matches(['\n', '\r']))),
                _ => Err(SecretProblem::at(
                    Some(format!("{name}_env")),
                    format!("`{name}_env` names the environment variable {var}, which is not set or empty"),
                )),
            },
            Place::File(path) => read_file(path).map_err(|why| {
                SecretProblem::at(Some(format!("{name}_file")), format!("`{name}_file` {}{why}", path.display()))
            }),
        }
    }
}

/// A secret file's value (one trailing newline dropped), or why not, as the end of a sentence
/// that starts with the path.
fn read_file(path: &Path) -> Result<Secret, String> {
    match std::fs::read_to_string(path) {
        Ok(v) if !v.trim().is_empty() => Ok(Secret::new(v.trim_end_matches(['\n', '\r']))),
        Ok(_) => Err(" is empty".to_string()),
        Err(e) => Err(format!(": cannot read it: {e}")),
    }
}

/// How often a secret file is checked for a change, at most: a `stat` per use would be cheap
/// too, but purges come in bursts of thousands and a rotation is noticed soon enough (and at
/// once on a 401/403, through [`Reload::reload`]).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What reading credentials again found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// New credentials: a request refused with the old ones is worth sending again.
    Changed,
    /// The same credentials (or ones that cannot change, from a variable).
    Unchanged,
    /// They could not be read; the ones in use stay.
    Failed(String),
}

impl Reloaded {
    /// The metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reloaded::Changed => "changed",
            Reloaded::Unchanged => "unchanged",
            Reloaded::Failed(_) => "failed",
        }
    }

    /// Several credentials read again: changed if any changed, failed if any failed.
    pub fn combine(self, other: Reloaded) -> Reloaded {
        match (self, other) {
            (Reloaded::Failed(e), _) | (_, Reloaded::Failed(e)) => Reloaded::Failed(e),
            (Reloaded::Changed, _) | (_, Reloaded::Changed) => Reloaded::Changed,
            _ => Reloaded::Unchanged,
        }
    }
}

/// Credentials that can be read again when a provider refuses them.
#[async_trait]
pub trait Reload: Send + Sync {
    async fn reload(&self) -> Reloaded;
}

/// A secret that follows its file: see the module documentation.
pub struct RotatingSecret {
    /// The setting, for log lines (`token_file`).
    setting: String,
    /// `None`: from a variable or inline, never read again.
    file: Option<PathBuf>,
    state: Mutex<FileState>,
}

struct FileState {
    value: Secret,
    /// The file's stamp when `value` was read.
    stamp: FileStamp,
    checked: Instant,
}

impl fmt::Debug for RotatingSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingSecret").field("setting", &self.setting).finish_non_exhaustive()
    }
}

/// A file's size and modification time (`None`: it cannot be read): what tells a rewritten
/// secret file without reading it.
pub type FileStamp = Option<(u64, Option<SystemTime>)>;

pub fn file_stamp(path: &Path) -> FileStamp {
    std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok()))
}

impl RotatingSecret {
    /// A secret that never changes (given inline or by a test).
    pub fn fixed(value: Secret) -> Arc<RotatingSecret> {
        Arc::new(RotatingSecret {
            setting: "value".into(),
            file: None,
            state: Mutex::new(FileState { value, stamp: None, checked: Instant::now() }),
        })
    }

    fn from_parts(name: &str, from: Place, value: Secret) -> RotatingSecret {
        let (setting, file) = match from {
            Place::File(path) => (format!("{name}_file"), Some(path)),
            Place::Env(_) => (format!("{name}_env"), None),
            Place::Inline(_) => (name.to_string(), None),
        };
        let stamp = file.as_deref().and_then(file_stamp);
        RotatingSecret { setting, file, state: Mutex::new(FileState { value, stamp, checked: Instant::now() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FileState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The value to use now: the file is checked for a change at most every [`CHECK_EVERY`]
    /// and read again when its size or modification time changed.
    pub fn current(&self) -> Secret {
        let Some(path) = &self.file else { return self.lock().value.clone() };
        let mut state = self.lock();
        if state.checked.elapsed() >= CHECK_EVERY {
            state.checked = Instant::now();
            let now = file_stamp(path);
            if now != state.stamp {
                self.read_into(&mut state, path, now);
            }
        }
        state.value.clone()
    }

    /// Reads the file now, whatever its stamp says (a rewrite within the file system's
    /// timestamp granularity keeps the stamp).
    pub fn reload_now(&self) -> Reloaded {
        let Some(path) = &self.file else { return Reloaded::Unchanged };
        let mut state = self.lock();
        state.checked = Instant::now();
        let now = file_stamp(path);
        self.read_into(&mut state, path, now)
    }

    fn read_into(&self, state: &mut FileState, path: &Path, now: FileStamp) -> Reloaded {
        match read_file(path) {
            Ok(value) => {
                state.stamp = now;
                if value == state.value {
                    return Reloaded::Unchanged;
                }
                state.value = value;
                tracing::info!(setting = %self.setting, file = %path.display(), "read a changed secret file");
                Reloaded::Changed
            }
            Err(why) => {
                // Half-written or being replaced: keep the value in use, look again later.
                let message = format!("{} {}{why}", self.setting, path.display());
                tracing::warn!(error = %message, "cannot read a secret file again; the value read before stays in use");
                Reloaded::Failed(message)
            }
        }
    }
}

#[async_trait]
impl Reload for RotatingSecret {
    async fn reload(&self) -> Reloaded {
        self.reload_now()
    }
}

/// Several secrets of one sink (EdgeGrid's three), read again together.
pub struct SecretSet(pub Vec<Arc<RotatingSecret>>);

#[async_trait]
impl Reload for SecretSet {
    async fn reload(&self) -> Reloaded {
        self.0.iter().map(|s| s.reload_now()).fold(Reloaded::Unchanged, Reloaded::combine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let p = dir.path().join("secret");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn one_convention_with_messages_that_name_the_setting_not_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.yaml");
        let path = file(&dir, "tok-3f9a\n");
        let by_file = SecretRef::of(&None, &Some(PathBuf::from("secret")));
        assert_eq!(by_file.resolve("token", Need::Required, &cfg).unwrap().unwrap().expose(), "tok-3f9a");

        let both = SecretRef::of(&Some("X".into()), &Some(path.clone()));
        let p = both.resolve("token", Need::Required, &cfg).unwrap_err();
        assert_eq!(p.key.as_deref(), Some("token_env"));
        assert!(p.message.contains("not both"), "{}", p.message);

        let none = SecretRef::default();
        assert!(none.resolve("token", Need::Optional, &cfg).unwrap().is_none());
        let p = none.resolve("token", Need::Required, &cfg).unwrap_err();
        assert_eq!(p.key, None);
        assert!(p.message.contains("`token_env` or `token_file` is required"), "{}", p.message);

        let unset = SecretRef::of(&Some("CDC_TEST_UNSET_SECRET_5e1d".into()), &None);
        let p = unset.resolve("token", Need::Required, &cfg).unwrap_err();
        assert!(p.message.contains("CDC_TEST_UNSET_SECRET_5e1d, which is not set"), "{}", p.message);

        std::fs::write(&path, "\n").unwrap();
        let p = by_file.resolve("token", Need::Required, &cfg).unwrap_err();
        assert!(p.message.ends_with(" is empty"), "{}", p.message);
        assert!(!p.message.contains("tok-3f9a"));

        let inline = Secret::plain("redis://h");
        let with_inline = SecretRef::of(&Some("X".into()), &None).with_inline(Some(&inline));
        let p = with_inline.resolve("url", Need::Required, &cfg).unwrap_err();
        assert!(p.message.contains("exactly one of `url`, `url_env` and `url_file` must be set (found 2)"));
        let only_inline = SecretRef::default().with_inline(Some(&inline));
        assert_eq!(only_inline.resolve("url", Need::Required, &cfg).unwrap().unwrap().expose(), "redis://h");
    }

    #[test]
    fn a_rotating_secret_follows_its_file_on_reload_and_on_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(&dir, "old-token-1\n");
        let secret = SecretRef::of(&None, &Some(path.clone()))
            .resolve_rotating("token", Need::Required, &dir.path().join("c.yaml"))
            .unwrap()
            .unwrap();
        assert_eq!(secret.current().expose(), "old-token-1");
        std::fs::write(&path, "new-token-22\n").unwrap();
        assert_eq!(secret.reload_now(), Reloaded::Changed);
        assert_eq!(secret.current().expose(), "new-token-22");
        assert_eq!(secret.reload_now(), Reloaded::Unchanged);
        // A file being replaced: the value in use stays.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(secret.reload_now(), Reloaded::Failed(_)));
        assert_eq!(secret.current().expose(), "new-token-22");
        // On use, within CHECK_EVERY of the last look: the new size is seen on the next check.
        std::fs::write(&path, "third-token-333\n").unwrap();
        secret.lock().checked = Instant::now() - CHECK_EVERY;
        assert_eq!(secret.current().expose(), "third-token-333");
        assert_eq!(crate::redact::scrub("x third-token-333"), "x <redacted>", "new values are redacted too");
    }
}
