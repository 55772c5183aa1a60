//! Akamai EdgeGrid (`EG1-HMAC-SHA256`) request signing, for the Fast Purge API, and the check
//! the Akamai test double makes.
//!
//! ```text
//! signing key = base64(HMAC-SHA256(key = client_secret, timestamp))
//! unsigned    = EG1-HMAC-SHA256 client_token=..;access_token=..;timestamp=..;nonce=..;
//! data        = METHOD \t scheme \t host \t path?query \t canonical headers \t content hash \t unsigned
//! signature   = base64(HMAC-SHA256(key = signing key, data))
//! header      = unsigned + "signature=" + signature
//! ```
//!
//! The content hash is base64(SHA-256) of the first `max_body` bytes of a POST body, empty for
//! other methods and empty bodies. Canonical headers are the configured `headers_to_sign`, in
//! that order, present ones only, as `name:value` with the name lower-cased and the value
//! trimmed with inner whitespace collapsed, joined by tabs (Fast Purge signs none). Checked
//! against Akamai's published test data (`tests/fixtures/edgegrid/`).

use std::fmt;
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};

use super::sigv4::UtcTime;
use crate::config::secret::Secret;

pub const ALGORITHM: &str = "EG1-HMAC-SHA256";

/// Akamai's own clients hash at most this much of a POST body; the server does the same.
pub const DEFAULT_MAX_BODY: usize = 131_072;

/// An EdgeGrid API client's credentials (the `.edgerc` section). `Debug` shows no secret.
#[derive(Clone)]
pub struct Credentials {
    pub client_token: String,
    pub client_secret: Secret,
    pub access_token: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials { .. }")
    }
}

/// What is signed of one request.
pub struct Request<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    /// `host[:port]` as sent in the `Host` header.
    pub host: &'a str,
    /// The path with `?query` if any.
    pub path_and_query: &'a str,
    /// The request's headers; only those named in [`Settings::headers_to_sign`] are signed.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// Per-client signing settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub headers_to_sign: Vec<String>,
    pub max_body: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { headers_to_sign: Vec::new(), max_body: DEFAULT_MAX_BODY }
    }
}

/// The `Authorization` header for `request`, signed at `timestamp` with `nonce`.
pub fn authorization(
    credentials: &Credentials,
    settings: &Settings,
    request: &Request<'_>,
    timestamp: &str,
    nonce: &str,
) -> String {
    let unsigned = format!(
        "{ALGORITHM} client_token={};access_token={};timestamp={timestamp};nonce={nonce};",
        credentials.client_token, credentials.access_token
    );
    let signature = signature(credentials, settings, request, timestamp, &unsigned);
    format!("{unsigned}signature={signature}")
}

/// base64(HMAC-SHA256(client_secret, timestamp)): the key for one timestamp.
pub fn signing_key(client_secret: &str, timestamp: &str) -> String {
    STANDARD.encode(hmac_sha256(client_secret.as_bytes(), timestamp.as_bytes()))
}

fn signature(
    credentials: &Credentials,
    settings: &Settings,
    request: &Request<'_>,
    timestamp: &str,
    unsigned: &str,
) -> String {
    let data = [
        request.method.to_ascii_uppercase(),
        request.scheme.to_ascii_lowercase(),
        request.host.to_ascii_lowercase(),
        request.path_and_query.to_string(),
        canonical_headers(settings, request.headers),
        content_hash(settings, request),
        unsigned.to_string(),
    ]
    .join("\t");
    let key = signing_key(credentials.client_secret.expose(), timestamp);
    STANDARD.encode(hmac_sha256(key.as_bytes(), data.as_bytes()))
}

fn canonical_headers(settings: &Settings, headers: &[(String, String)]) -> String {
    settings
        .headers_to_sign
        .iter()
        .filter_map(|wanted| {
            let (_, value) = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(wanted))?;
            Some(format!("{}:{}", wanted.to_ascii_lowercase(), value.split_whitespace().collect::<Vec<_>>().join(" ")))
        })
        .collect::<Vec<_>>()
        .join("\t")
}

fn content_hash(settings: &Settings, request: &Request<'_>) -> String {
    if !request.method.eq_ignore_ascii_case("POST") || request.body.is_empty() {
        return String::new();
    }
    let end = request.body.len().min(settings.max_body);
    STANDARD.encode(Sha256::digest(&request.body[..end]))
}

/// An EdgeGrid timestamp: `YYYYMMDDTHH:MM:SS+0000`.
pub fn timestamp(at: SystemTime) -> String {
    let t = UtcTime::from(at);
    format!("{:04}{:02}{:02}T{:02}:{:02}:{:02}+0000", t.year, t.month, t.day, t.hour, t.minute, t.second)
}

/// A fresh random nonce (a version 4 UUID, as Akamai's clients send).
pub fn nonce() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = super::sigv4::hex(&b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_edgegrids_format() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_395_430_461);
        assert_eq!(timestamp(at), "20140321T19:34:21+0000");
    }

    #[test]
    fn nonces_are_uuid_shaped_and_differ() {
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
    }
}
