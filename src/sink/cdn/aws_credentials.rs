//! AWS credentials for the CloudFront sink: explicit keys, or the credential chain AWS's own
//! SDKs use, refreshed before temporary credentials expire.
//!
//! - `credentials: keys` (the default): `access_key_id_*`, `secret_access_key_*` and, for
//!   temporary keys, `session_token_*`, each from a variable or a file
//!   ([`crate::config::secret`]). A file is followed: rewritten keys sign the next request.
//! - `credentials: chain`: the first of these that is configured, as the AWS SDKs look:
//!   1. the environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`;
//!   2. a web identity (EKS IAM roles for service accounts, GitHub OIDC):
//!      `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN` (`AWS_ROLE_SESSION_NAME` optional),
//!      exchanged at STS (`AssumeRoleWithWebIdentity`, at `sts_endpoint`) for temporary
//!      credentials; the token file is read at every exchange (the kubelet rotates it);
//!   3. the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else
//!      `~/.aws/credentials`), profile `profile`, else `AWS_PROFILE`, else `default`;
//!      followed like a secret file: a rewritten file is read again.
//!
//! Temporary credentials carry an `Expiration`; they are exchanged again [`REFRESH_AHEAD`]
//! before it (or halfway through their life, if that is sooner), on the first request that
//! needs them, so a purge is never signed with credentials about to expire. If STS cannot be
//! reached then, the credentials in hand are used until they expire. And whatever the source,
//! a 403 from CloudFront reads the credentials again ([`Reload`]) and, when they changed, the
//! request goes once more before it counts as refused (`super::http::Sender::with_reload`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::Deserialize;

use super::cloudfront::xml_text;
use super::sigv4;
use crate::config::secret::{file_stamp, FileStamp, Reload, Reloaded, RotatingSecret, Secret, CHECK_EVERY};

/// Temporary credentials are exchanged again this long before they expire at the latest.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(300);
/// `RoleSessionName` when `AWS_ROLE_SESSION_NAME` is not set: CloudTrail shows it.
const DEFAULT_SESSION_NAME: &str = "cdc-invalidator";
const STS_VERSION: &str = "2011-06-15";

/// `sinks.cdn[].credentials` of a CloudFront sink.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CredentialsFrom {
    /// `access_key_id_*`, `secret_access_key_*`, `session_token_*`.
    #[default]
    Keys,
    /// The environment, a web identity, or the shared credentials file.
    Chain,
}

/// The environment variables the chain reads, captured once (a process's environment does not
/// change under it; tests give their own). `Debug` shows the names only.
#[derive(Clone, Default)]
pub struct AwsEnv {
    vars: BTreeMap<String, String>,
}

/// Every variable the chain looks at.
const VARIABLES: [&str; 9] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "HOME",
];

impl fmt::Debug for AwsEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.vars.keys()).finish()
    }
}

impl AwsEnv {
    /// This process's variables.
    pub fn from_process() -> AwsEnv {
        AwsEnv::from_vars(VARIABLES.iter().filter_map(|&k| std::env::var(k).ok().map(|v| (k.to_string(), v))))
    }

    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> AwsEnv {
        AwsEnv { vars: vars.into_iter().filter(|(k, _)| VARIABLES.contains(&k.as_str())).collect() }
    }

    /// A variable's value; an empty one counts as unset, as the SDKs do.
    fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str).filter(|v| !v.trim().is_empty())
    }

    /// The shared credentials file and the profile to read in it.
    fn profile_file(&self, profile: Option<&str>) -> Option<(PathBuf, String)> {
        let file = match (self.get("AWS_SHARED_CREDENTIALS_FILE"), self.get("HOME")) {
            (Some(f), _) => PathBuf::from(f),
            (None, Some(home)) => Path::new(home).join(".aws").join("credentials"),
            (None, None) => return None,
        };
        let profile = profile.or(self.get("AWS_PROFILE")).unwrap_or("default");
        Some((file, profile.to_string()))
    }

    /// Which link of the chain would answer, checked without the network, for the config
    /// loader: a chain that can find nothing is a configuration problem, found at start.
    pub fn check_chain(&self, profile: Option<&str>) -> Result<&'static str, String> {
        match (self.get("AWS_ACCESS_KEY_ID"), self.get("AWS_SECRET_ACCESS_KEY")) {
            (Some(_), Some(_)) => return Ok("environment"),
            (Some(_), None) | (None, Some(_)) => {
                return Err("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together".into())
            }
            (None, None) => {}
        }
        match (self.get("AWS_WEB_IDENTITY_TOKEN_FILE"), self.get("AWS_ROLE_ARN")) {
            (Some(_), Some(_)) => return Ok("web identity"),
            (Some(_), None) => return Err("AWS_WEB_IDENTITY_TOKEN_FILE is set without AWS_ROLE_ARN".into()),
            _ => {}
        }
        if let Some((file, name)) = self.profile_file(profile) {
            if let Ok(text) = std::fs::read_to_string(&file) {
                return match profile_keys(&text, &name) {
                    Some(_) => Ok("shared credentials file"),
                    None => Err(format!(
                        "the shared credentials file {} has no profile [{name}] with aws_access_key_id and aws_secret_access_key",
                        file.display()
                    )),
                };
            }
        }
        Err("credentials: chain found no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN, or a profile in ~/.aws/credentials (AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE)".into())
    }
}

/// Why credentials could not be had. Retriable: STS unreachable, throttled or failing; fatal:
/// what only an operator can fix (a refused token, a missing profile).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwsCredentialsError {
    #[error("{0}")]
    Retriable(String),
    #[error("{0}")]
    Fatal(String),
}

impl AwsCredentialsError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, AwsCredentialsError::Retriable(_))
    }
}

/// Credentials from one link of the chain, and when to look again.
#[derive(Clone)]
struct Snapshot {
    credentials: sigv4::Credentials,
    /// When temporary credentials expire.
    expires: Option<SystemTime>,
    /// When to exchange them again (before `expires`).
    refresh_at: Option<SystemTime>,
    /// The shared credentials file they were read from, with its stamp then.
    file: Option<(PathBuf, FileStamp)>,
}

impl Snapshot {
    fn lasting(credentials: sigv4::Credentials) -> Snapshot {
        Snapshot { credentials, expires: None, refresh_at: None, file: None }
    }

    fn expiring(credentials: sigv4::Credentials, expires: SystemTime, now: SystemTime) -> Snapshot {
        let life = expires.duration_since(now).unwrap_or(Duration::ZERO);
        let ahead = REFRESH_AHEAD.min(life / 2);
        Snapshot { credentials, expires: Some(expires), refresh_at: Some(expires - ahead), file: None }
    }
}

fn same(a: &sigv4::Credentials, b: &sigv4::Credentials) -> bool {
    a.access_key_id == b.access_key_id
        && a.secret_access_key == b.secret_access_key
        && a.session_token == b.session_token
}

/// Where a sink's AWS credentials come from.
enum Source {
    /// Explicit keys, each following its file.
    Keys {
        key_id: Arc<RotatingSecret>,
        secret: Arc<RotatingSecret>,
        token: Option<Arc<RotatingSecret>>,
    },
    Chain(Chain),
}

struct Chain {
    env: AwsEnv,
    profile: Option<String>,
    sts_endpoint: String,
    client: reqwest::Client,
}

/// A CloudFront sink's credentials: see the module documentation.
pub struct AwsCredentials {
    source: Source,
    /// The chain's current credentials (`None` before the first request).
    current: RwLock<Option<Snapshot>>,
    /// One exchange at a time: concurrent requests wait for it instead of each calling STS.
    refreshing: tokio::sync::Mutex<()>,
    /// The last look at the shared credentials file (at most one `stat` per [`CHECK_EVERY`]).
    checked: Mutex<Instant>,
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.source {
            Source::Keys { .. } => "keys",
            Source::Chain(_) => "chain",
        };
        f.debug_struct("AwsCredentials").field("source", &kind).finish_non_exhaustive()
    }
}

impl AwsCredentials {
    fn with_source(source: Source) -> AwsCredentials {
        AwsCredentials {
            source,
            current: RwLock::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            checked: Mutex::new(Instant::now()),
        }
    }

    /// Explicit keys (`credentials: keys`).
    pub fn keys(
        key_id: Arc<RotatingSecret>,
        secret: Arc<RotatingSecret>,
        token: Option<Arc<RotatingSecret>>,
    ) -> AwsCredentials {
        AwsCredentials::with_source(Source::Keys { key_id, secret, token })
    }

    /// Keys that never change (tests).
    pub fn fixed(c: sigv4::Credentials) -> AwsCredentials {
        AwsCredentials::keys(
            RotatingSecret::fixed(Secret::plain(c.access_key_id)),
            RotatingSecret::fixed(c.secret_access_key),
            c.session_token.map(RotatingSecret::fixed),
        )
    }

    /// The chain (`credentials: chain`); STS requests time out after `timeout`.
    pub fn chain(
        env: AwsEnv,
        profile: Option<String>,
        sts_endpoint: &str,
        timeout: Duration,
    ) -> Result<AwsCredentials, String> {
        let client = super::http::client(timeout)?;
        let sts_endpoint = sts_endpoint.trim_end_matches('/').to_string() + "/";
        Ok(AwsCredentials::with_source(Source::Chain(Chain { env, profile, sts_endpoint, client })))
    }

    /// The credentials to sign with now (the request builder runs per attempt and is not
    /// async; [`AwsCredentials::ensure_fresh`] runs before it). `None` until the chain found
    /// credentials.
    pub fn current(&self) -> Option<sigv4::Credentials> {
        match &self.source {
            Source::Keys { key_id, secret, token } => Some(sigv4::Credentials {
                access_key_id: key_id.current().expose().to_string(),
                secret_access_key: secret.current(),
                session_token: token.as_ref().map(|t| t.current()),
            }),
            Source::Chain(_) => self.snapshot().map(|s| s.credentials),
        }
    }

    fn snapshot(&self) -> Option<Snapshot> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the chain's credentials must be looked up again: none yet, due for refresh, or
    /// their shared credentials file changed.
    fn due(&self, now: SystemTime) -> bool {
        let Some(snapshot) = self.snapshot() else { return true };
        if snapshot.refresh_at.is_some_and(|at| now >= at) {
            return true;
        }
        if let Some((path, stamp)) = &snapshot.file {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            if checked.elapsed() >= CHECK_EVERY {
                *checked = Instant::now();
                return file_stamp(path) != *stamp;
            }
        }
        false
    }

    /// Makes sure [`AwsCredentials::current`] holds credentials that are not about to expire:
    /// looks the chain up at first use, when temporary credentials are due for refresh, and
    /// when the shared credentials file changed. A failed refresh keeps credentials that have
    /// not expired yet (logged); `Err` when there are none.
    pub async fn ensure_fresh(&self) -> Result<(), AwsCredentialsError> {
        let Source::Chain(chain) = &self.source else { return Ok(()) };
        if !self.due(SystemTime::now()) {
            return Ok(());
        }
        let _one = self.refreshing.lock().await;
        // Another request may have refreshed them while this one waited.
        if !self.due(SystemTime::now()) {
            return Ok(());
        }
        match chain.resolve().await {
            Ok(snapshot) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(snapshot);
                Ok(())
            }
            Err(e) => {
                let usable = self.snapshot().is_some_and(|s| s.expires.is_none_or(|at| SystemTime::now() < at));
                if usable {
                    tracing::warn!(error = %e, "cannot refresh the AWS credentials; the current ones stay in use until they expire");
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }
}

#[async_trait]
impl Reload for AwsCredentials {
    /// Reads the credentials again now, whatever their expiry says (CloudFront refused them).
    async fn reload(&self) -> Reloaded {
        match &self.source {
            Source::Keys { key_id, secret, token } => [Some(key_id), Some(secret), token.as_ref()]
                .into_iter()
                .flatten()
                .map(|s| s.reload_now())
                .fold(Reloaded::Unchanged, Reloaded::combine),
            Source::Chain(chain) => {
                let _one = self.refreshing.lock().await;
                match chain.resolve().await {
                    Ok(snapshot) => {
                        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
                        let changed = current.as_ref().is_none_or(|old| !same(&old.credentials, &snapshot.credentials));
                        *current = Some(snapshot);
                        if changed {
                            Reloaded::Changed
                        } else {
                            Reloaded::Unchanged
                        }
                    }
                    Err(e) => Reloaded::Failed(e.to_string()),
                }
            }
        }
    }
}

impl Chain {
    /// The first link of the chain that is configured, asked now.
    async fn resolve(&self) -> Result<Snapshot, AwsCredentialsError> {
        let env = &self.env;
        if let (Some(id), Some(secret)) = (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")) {
            return Ok(Snapshot::lasting(sigv4::Credentials {
                access_key_id: id.to_string(),
                secret_access_key: Secret::new(secret),
                session_token: env.get("AWS_SESSION_TOKEN").map(Secret::new),
            }));
        }
        if let (Some(token_file), Some(role)) = (env.get("AWS_WEB_IDENTITY_TOKEN_FILE"), env.get("AWS_ROLE_ARN")) {
            let token = tokio::fs::read_to_string(token_file).await.map_err(|e| {
                // The kubelet may be replacing it: worth another try.
                AwsCredentialsError::Retriable(format!("cannot read AWS_WEB_IDENTITY_TOKEN_FILE {token_file}: {e}"))
            })?;
            let session = env.get("AWS_ROLE_SESSION_NAME").unwrap_or(DEFAULT_SESSION_NAME);
            return self.assume_role_with_web_identity(token.trim(), role, session).await;
        }
        let Some((file, profile)) = env.profile_file(self.profile.as_deref()) else {
            return Err(AwsCredentialsError::Fatal("no AWS credentials: the chain found nothing".into()));
        };
        let stamp = file_stamp(&file);
        let text = tokio::fs::read_to_string(&file).await.map_err(|e| {
            AwsCredentialsError::Fatal(format!("cannot read the shared credentials file {}: {e}", file.display()))
        })?;
        let Some(credentials) = profile_keys(&text, &profile) else {
            return Err(AwsCredentialsError::Fatal(format!(
                "the shared credentials file {} has no profile [{profile}] with aws_access_key_id and aws_secret_access_key",
                file.display()
            )));
        };
        Ok(Snapshot { file: Some((file, stamp)), ..Snapshot::lasting(credentials) })
    }

    /// STS `AssumeRoleWithWebIdentity` (an unsigned query API call; the token is the proof).
    async fn assume_role_with_web_identity(
        &self,
        token: &str,
        role_arn: &str,
        session: &str,
    ) -> Result<Snapshot, AwsCredentialsError> {
        let form = [
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", STS_VERSION),
            ("RoleArn", role_arn),
            ("RoleSessionName", session),
            ("WebIdentityToken", token),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", sigv4::uri_encode(v.as_bytes())))
        .collect::<Vec<_>>()
        .join("&");
        let sent = self
            .client
            .post(&self.sts_endpoint)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded; charset=utf-8")
            .body(form)
            .send()
            .await;
        let response = sent.map_err(|e| {
            AwsCredentialsError::Retriable(format!("STS AssumeRoleWithWebIdentity: {}", e.without_url()))
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| {
            AwsCredentialsError::Retriable(format!("STS AssumeRoleWithWebIdentity: {}", e.without_url()))
        })?;
        let now = SystemTime::now();
        parse_sts_answer(status.as_u16(), &text, now)
    }
}

/// Reads STS's answer: the `<Credentials>` of an `AssumeRoleWithWebIdentityResponse`, or the
/// `<Error>` of an `ErrorResponse` (throttling, 5xx and `IDPCommunicationError` are worth
/// another try; a refused token or role is not).
fn parse_sts_answer(status: u16, text: &str, now: SystemTime) -> Result<Snapshot, AwsCredentialsError> {
    if !(200..300).contains(&status) {
        let code = xml_text(text, "Code").unwrap_or_default();
        let message = super::http::one_line(&xml_text(text, "Message").unwrap_or_default());
        let sentence = format!("STS AssumeRoleWithWebIdentity: HTTP {status} {code}: {message}");
        let retriable = status >= 500
            || status == 429
            || matches!(code.as_str(), "Throttling" | "IDPCommunicationError" | "ServiceUnavailable");
        return Err(if retriable {
            AwsCredentialsError::Retriable(sentence)
        } else {
            AwsCredentialsError::Fatal(sentence)
        });
    }
    let field = |tag: &str| {
        xml_text(text, tag).filter(|v| !v.is_empty()).ok_or_else(|| {
            AwsCredentialsError::Retriable(format!("STS AssumeRoleWithWebIdentity: no {tag} in the answer"))
        })
    };
    let (id, secret, token, expiration) =
        (field("AccessKeyId")?, field("SecretAccessKey")?, field("SessionToken")?, field("Expiration")?);
    let expires = parse_iso8601(&expiration).ok_or_else(|| {
        AwsCredentialsError::Retriable(format!(
            "STS AssumeRoleWithWebIdentity: Expiration {expiration:?} is not a time"
        ))
    })?;
    let credentials = sigv4::Credentials {
        access_key_id: id,
        secret_access_key: Secret::new(secret),
        session_token: Some(Secret::new(token)),
    };
    Ok(Snapshot::expiring(credentials, expires, now))
}

/// The keys of `[profile]` in a shared credentials file (INI: `[name]` sections, `key = value`
/// lines, `#` and `;` comments; `[profile name]` as in `~/.aws/config` is accepted too).
fn profile_keys(text: &str, profile: &str) -> Option<sigv4::Credentials> {
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let section = section.trim();
            in_profile = section == profile || section.strip_prefix("profile ").map(str::trim) == Some(profile);
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = value.trim().to_string();
            match key.trim().to_ascii_lowercase().as_str() {
                "aws_access_key_id" => id = Some(value),
                "aws_secret_access_key" => secret = Some(value),
                "aws_session_token" => token = Some(value),
                _ => {}
            }
        }
    }
    Some(sigv4::Credentials {
        access_key_id: id.filter(|v| !v.is_empty())?,
        secret_access_key: Secret::new(secret.filter(|v| !v.is_empty())?),
        session_token: token.filter(|v| !v.is_empty()).map(Secret::new),
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z`, as STS writes `Expiration`.
pub fn parse_iso8601(text: &str) -> Option<SystemTime> {
    let text = text.trim().strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut t = time.splitn(3, ':').map(|p| p.parse::<u64>().ok());
    let (hour, minute, second) = (t.next()??, t.next()??, t.next()??);
    // The years bound the arithmetic below: an answer from the network must not overflow it.
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = crate::calendar::days_from_civil(year, month, day);
    let secs = u64::try_from(days).ok()? * 86_400 + hour * 3600 + minute * 60 + second;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiration_times_parse_as_sts_writes_them() {
        let at = parse_iso8601("2014-10-24T23:00:23Z").unwrap();
        assert_eq!(sigv4::amz_date(at), "20141024T230023Z");
        let at = parse_iso8601("2026-02-28T00:00:00.000Z").unwrap();
        assert_eq!(sigv4::amz_date(at), "20260228T000000Z");
        assert!(parse_iso8601("2014-10-24 23:00:23").is_none());
        assert!(parse_iso8601("2014-13-24T23:00:23Z").is_none());
        assert!(parse_iso8601("99999999999999999-01-01T00:00:00Z").is_none());
        assert!(parse_iso8601("1969-12-31T23:59:59Z").is_none());
    }

    #[test]
    fn the_sts_answer_is_read_and_refreshed_before_it_expires() {
        let answer = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:cdc:invalidator</SubjectFromWebIdentityToken>
    <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/purge/cdc-invalidator</Arn><AssumedRoleId>AROA:cdc</AssumedRoleId></AssumedRoleUser>
    <Credentials>
      <SessionToken>FwoGZXIvYXdzEXAMPLE</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2014-10-24T23:00:23Z</Expiration>
      <AccessKeyId>ASIAIOSFODNN7EXAMPLE</AccessKeyId>
    </Credentials>
    <Provider>oidc.eks.example</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>ad4156e9</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#;
        let expires = parse_iso8601("2014-10-24T23:00:23Z").unwrap();
        let issued = expires - Duration::from_secs(3600);
        let s = parse_sts_answer(200, answer, issued).unwrap();
        assert_eq!(s.credentials.access_key_id, "ASIAIOSFODNN7EXAMPLE");
        assert_eq!(s.credentials.session_token.as_ref().unwrap().expose(), "FwoGZXIvYXdzEXAMPLE");
        assert_eq!(s.expires, Some(expires));
        assert_eq!(s.refresh_at, Some(expires - REFRESH_AHEAD));
        // Short-lived credentials: halfway through their life.
        let s = parse_sts_answer(200, answer, expires - Duration::from_secs(4)).unwrap();
        assert_eq!(s.refresh_at, Some(expires - Duration::from_secs(2)));

        let refused = r#"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>Token expired</Message></Error></ErrorResponse>"#;
        let e = parse_sts_answer(400, refused, issued).err().unwrap();
        assert!(!e.is_retriable());
        assert!(e.to_string().contains("InvalidIdentityToken: Token expired"), "{e}");
        let busy = r#"<ErrorResponse><Error><Code>IDPCommunicationError</Code><Message>try again</Message></Error></ErrorResponse>"#;
        assert!(parse_sts_answer(400, busy, issued).err().unwrap().is_retriable());
        assert!(parse_sts_answer(503, "", issued).err().unwrap().is_retriable());
    }

    #[test]
    fn profiles_are_read_from_the_shared_credentials_file() {
        let text = "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s1\n\n# comment\n[profile purge]\naws_access_key_id=AKIDPURGE\naws_secret_access_key=s2\naws_session_token = t2\n";
        let c = profile_keys(text, "default").unwrap();
        assert_eq!((c.access_key_id.as_str(), c.secret_access_key.expose()), ("AKIDDEFAULT", "s1"));
        assert!(c.session_token.is_none());
        let c = profile_keys(text, "purge").unwrap();
        assert_eq!(c.session_token.unwrap().expose(), "t2");
        assert!(profile_keys(text, "other").is_none());
    }

    #[test]
    fn the_chain_says_what_it_would_use_or_why_nothing() {
        let env = |pairs: &[(&str, &str)]| AwsEnv::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        assert_eq!(
            env(&[("AWS_ACCESS_KEY_ID", "a"), ("AWS_SECRET_ACCESS_KEY", "b")]).check_chain(None),
            Ok("environment")
        );
        assert!(env(&[("AWS_ACCESS_KEY_ID", "a")]).check_chain(None).is_err());
        assert_eq!(
            env(&[("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"), ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r")]).check_chain(None),
            Ok("web identity")
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credentials");
        std::fs::write(&file, "[cdn]\naws_access_key_id = A\naws_secret_access_key = B\n").unwrap();
        let shared = env(&[("AWS_SHARED_CREDENTIALS_FILE", file.to_str().unwrap())]);
        assert_eq!(shared.check_chain(Some("cdn")), Ok("shared credentials file"));
        assert!(shared.check_chain(None).unwrap_err().contains("no profile [default]"));
        assert!(env(&[]).check_chain(None).unwrap_err().contains("found no AWS credentials"));
        assert!(!format!("{:?}", env(&[("AWS_SECRET_ACCESS_KEY", "hidden-9f")])).contains("hidden-9f"));
    }
}
