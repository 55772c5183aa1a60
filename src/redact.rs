//! Secrets kept out of every output: logs, fatal errors, config problems, dead letters and
//! `/metrics`.
//!
//! Every [`crate::config::Secret`] made from a setting (passwords, tokens, URLs, and librdkafka
//! values given through `_env`/`_file` or under a sensitive key) is registered here when the
//! config is loaded. Outputs pass their text through [`scrub`], which replaces each registered
//! secret, and the password of any `scheme://user:password@host` URL, by `<redacted>`. Why a
//! registry instead of care at each call site: the texts that leak are written by libraries
//! (librdkafka quotes a rejected value, a CDN's 400 body echoes the request's headers, the Redis
//! client may quote the URL) and cannot be reviewed one by one.

use std::borrow::Cow;
use std::sync::RwLock;

/// What replaces a secret.
pub const REDACTED: &str = "<redacted>";

/// Shorter values are not registered: replacing every `on` or `10` would garble the logs, and a
/// value that short is no secret worth the name.
const MIN_LEN: usize = 4;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers a secret value: from now on [`scrub`] hides it.
pub fn register(secret: &str) {
    let secret = secret.trim();
    if secret.chars().count() < MIN_LEN {
        return;
    }
    add(secret.to_string());
    // As JSON log lines and `{:?}` print it: a password holding `"` or `\` is escaped there.
    // Added as is, never escaped again (escaping an escaped text never ends).
    if let Ok(quoted) = serde_json::to_string(secret) {
        if let Some(escaped) = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
            if escaped != secret {
                add(escaped.to_string());
            }
        }
    }
    // The password inside a URL on its own: an error may quote just that part.
    if let Some(password) = url_password(secret) {
        register(password);
    }
}

fn add(secret: String) {
    let mut all = SECRETS.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    if !all.contains(&secret) {
        all.push(secret);
        // Longest first, so a URL is replaced whole before the password inside it.
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// `text` with every registered secret and every URL password replaced by `<redacted>`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let all = SECRETS.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut out = Cow::Borrowed(text);
    for secret in all.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
        }
    }
    drop(all);
    if out.contains("://") {
        if let Some(cleaned) = scrub_url_passwords(&out) {
            out = Cow::Owned(cleaned);
        }
    }
    out
}

/// The password of `scheme://user:password@host...`, if any.
fn url_password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let password = &userinfo[userinfo.find(':')? + 1..];
    (!password.is_empty()).then_some(password)
}

/// Replaces the password of every `scheme://user:password@` in `text`; `None` when there is none.
fn scrub_url_passwords(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first character a URL's authority cannot hold unescaped.
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@').map(|at| (&authority[..at], &authority[at..])) {
            Some((userinfo, host)) if userinfo.contains(':') => {
                let user = &userinfo[..userinfo.find(':').unwrap_or(0)];
                out.push_str(user);
                out.push(':');
                out.push_str(REDACTED);
                out.push_str(host);
                changed = true;
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// A writer that scrubs what it is given before passing it on: the logging layer writes each
/// event with one `write_all`, so a secret is never split across calls.
pub struct ScrubbingWriter<W>(pub W);

impl<W: std::io::Write> std::io::Write for ScrubbingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => self.0.write_all(scrub(text).as_bytes())?,
            Err(_) => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_and_url_passwords_are_hidden() {
        register("sentinel-7c1e-redact-test");
        let text = "No such configuration property: \"sasl.pasword\" (value \"sentinel-7c1e-redact-test\")";
        assert_eq!(scrub(text), "No such configuration property: \"sasl.pasword\" (value \"<redacted>\")");
        assert_eq!(
            scrub("connect redis://:p4ss-word@10.0.0.1:6379/0 failed"),
            "connect redis://:<redacted>@10.0.0.1:6379/0 failed"
        );
        assert_eq!(
            scrub("to https://user:pw@h/x and http://plain/y"),
            "to https://user:<redacted>@h/x and http://plain/y"
        );
        assert!(matches!(scrub("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn the_password_inside_a_registered_url_is_registered_too() {
        register("redis://:urlpass-4f2a@127.0.0.1:1/0");
        assert_eq!(scrub("AUTH failed for urlpass-4f2a"), "AUTH failed for <redacted>");
        register("on");
        assert_eq!(scrub("on"), "on");
        register("quo\"te\\pw");
        assert_eq!(scrub(r#"{"error":"bad quo\"te\\pw"}"#), r#"{"error":"bad <redacted>"}"#);
    }
}
