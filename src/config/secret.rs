//! The values components share with the configuration: [`Secret`] and paths relative to the
//! config file. A leaf (like [`super::duration`]): it uses nothing else of `config`, so a
//! component (the CDN sinks) can use it while `config` embeds the component's own config type,
//! without an import cycle between `config` and the component.

use std::fmt;
use std::path::{Path, PathBuf};

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
