//! The receiving side of request signing, as AWS (SigV4) and Akamai (EdgeGrid) check it: only
//! the test doubles and the signing tests need it, so it lives with them, not in the daemon.
//! Each recomputes the signature with the daemon's own signer over what the request says was
//! signed, and compares.

use std::time::{Duration, SystemTime};

use cdc_invalidator::sink::cdn::{edgegrid, sigv4};

/// Why a signed request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    UnknownKey,
    SignedHeaderMissing(String),
    WrongScope(String),
    BadTimestamp,
    Stale,
    Mismatch,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Missing => f.write_str("no Authorization header"),
            Refusal::Malformed => f.write_str("the Authorization header is malformed"),
            Refusal::UnknownKey => f.write_str("unknown access key or client token"),
            Refusal::SignedHeaderMissing(h) => write!(f, "signed header {h} is missing from the request"),
            Refusal::WrongScope(s) => write!(f, "the credential scope {s} does not match this request"),
            Refusal::BadTimestamp => f.write_str("the timestamp is not YYYYMMDDTHH:MM:SS+0000"),
            Refusal::Stale => f.write_str("the timestamp is too far from the server's clock"),
            Refusal::Mismatch => f.write_str("the signature does not match"),
        }
    }
}

fn authorization_header(headers: &[(String, String)]) -> Result<&str, Refusal> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.as_str())
        .ok_or(Refusal::Missing)
}

/// The parts of a received SigV4 `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigV4Authorization {
    pub access_key_id: String,
    /// `date/region/service/aws4_request`.
    pub scope: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

pub fn parse_sigv4(header: &str) -> Result<SigV4Authorization, Refusal> {
    let rest = header.strip_prefix(sigv4::ALGORITHM).ok_or(Refusal::Malformed)?.trim_start();
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (key, value) = part.trim().split_once('=').ok_or(Refusal::Malformed)?;
        match key {
            "Credential" => credential = Some(value),
            "SignedHeaders" => signed = Some(value),
            "Signature" => signature = Some(value),
            _ => return Err(Refusal::Malformed),
        }
    }
    let (Some(credential), Some(signed), Some(signature)) = (credential, signed, signature) else {
        return Err(Refusal::Malformed);
    };
    let (access_key_id, scope) = credential.split_once('/').ok_or(Refusal::Malformed)?;
    Ok(SigV4Authorization {
        access_key_id: access_key_id.to_string(),
        scope: scope.to_string(),
        signed_headers: signed.split(';').map(str::to_string).collect(),
        signature: signature.to_string(),
    })
}

/// Checks a received request the way AWS does: recomputes the signature over the headers the
/// client says it signed and compares. `headers` are all the request's headers.
#[allow(clippy::too_many_arguments)]
pub fn sigv4_verify(
    credentials: &sigv4::Credentials,
    region: &str,
    service: &str,
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    payload: &[u8],
) -> Result<(), Refusal> {
    let auth = parse_sigv4(authorization_header(headers)?)?;
    if auth.access_key_id != credentials.access_key_id {
        return Err(Refusal::UnknownKey);
    }
    let mut signed: Vec<(String, String)> = Vec::new();
    for name in &auth.signed_headers {
        let found: Vec<_> = headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).collect();
        if found.is_empty() {
            return Err(Refusal::SignedHeaderMissing(name.clone()));
        }
        signed.extend(found.into_iter().map(|(_, v)| (name.clone(), v.clone())));
    }
    if !auth.signed_headers.iter().any(|n| n == "host") {
        return Err(Refusal::SignedHeaderMissing("host".into()));
    }
    let request = sigv4::Request { method, path, query, headers: &signed, payload };
    let expected = sigv4::sign(credentials, region, service, &request).map_err(|_| Refusal::Malformed)?;
    let expected_scope = expected.string_to_sign.lines().nth(2).map(str::to_string).unwrap_or_default();
    if auth.scope != expected_scope {
        return Err(Refusal::WrongScope(auth.scope));
    }
    if auth.signature != expected.signature {
        return Err(Refusal::Mismatch);
    }
    Ok(())
}

/// The fields of a received EdgeGrid header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeGridAuthorization {
    pub client_token: String,
    pub access_token: String,
    pub timestamp: String,
    pub nonce: String,
    pub signature: String,
}

pub fn parse_edgegrid(header: &str) -> Result<EdgeGridAuthorization, Refusal> {
    let rest = header.strip_prefix(edgegrid::ALGORITHM).ok_or(Refusal::Malformed)?.trim_start();
    let mut fields: [Option<String>; 5] = Default::default();
    for part in rest.split(';').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').ok_or(Refusal::Malformed)?;
        let slot = match key {
            "client_token" => 0,
            "access_token" => 1,
            "timestamp" => 2,
            "nonce" => 3,
            "signature" => 4,
            _ => return Err(Refusal::Malformed),
        };
        fields[slot] = Some(value.to_string());
    }
    let [Some(client_token), Some(access_token), Some(timestamp), Some(nonce), Some(signature)] = fields else {
        return Err(Refusal::Malformed);
    };
    Ok(EdgeGridAuthorization { client_token, access_token, timestamp, nonce, signature })
}

/// Parses `YYYYMMDDTHH:MM:SS+0000` (UTC only, as EdgeGrid sends).
pub fn parse_edgegrid_timestamp(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 22 || b[8] != b'T' || b[11] != b':' || b[14] != b':' || &s[17..] != "+0000" {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(9..11)?, num(12..14)?, num(15..17)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    u64::try_from(secs).ok().map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

/// Checks a received request as Akamai does: known tokens, a timestamp within `max_skew` of
/// `now`, and the header the daemon's signer makes for the same request, timestamp and nonce.
pub fn edgegrid_verify(
    credentials: &edgegrid::Credentials,
    settings: &edgegrid::Settings,
    request: &edgegrid::Request<'_>,
    now: SystemTime,
    max_skew: Duration,
) -> Result<EdgeGridAuthorization, Refusal> {
    let header = authorization_header(request.headers)?;
    let auth = parse_edgegrid(header)?;
    if auth.client_token != credentials.client_token || auth.access_token != credentials.access_token {
        return Err(Refusal::UnknownKey);
    }
    let at = parse_edgegrid_timestamp(&auth.timestamp).ok_or(Refusal::BadTimestamp)?;
    let skew = match now.duration_since(at) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    if skew > max_skew {
        return Err(Refusal::Stale);
    }
    // The signer signs the request without its Authorization header.
    let unsigned: Vec<(String, String)> =
        request.headers.iter().filter(|(n, _)| !n.eq_ignore_ascii_case("authorization")).cloned().collect();
    let request = edgegrid::Request { headers: &unsigned, ..*request };
    let expected = edgegrid::authorization(credentials, settings, &request, &auth.timestamp, &auth.nonce);
    if expected != header {
        return Err(Refusal::Mismatch);
    }
    Ok(auth)
}

#[test]
fn edgegrid_timestamps_round_trip_and_headers_need_every_field() {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_395_430_461);
    assert_eq!(edgegrid::timestamp(at), "20140321T19:34:21+0000");
    assert_eq!(parse_edgegrid_timestamp("20140321T19:34:21+0000"), Some(at));
    assert_eq!(parse_edgegrid_timestamp("20140321T19:34:21+0100"), None);
    assert_eq!(parse_edgegrid_timestamp("2014-03-21T19:34:21Z"), None);
    assert_eq!(parse_edgegrid_timestamp("20141321T19:34:21+0000"), None);
    let ok = "EG1-HMAC-SHA256 client_token=c;access_token=a;timestamp=t;nonce=n;signature=s";
    assert_eq!(parse_edgegrid(ok).unwrap().signature, "s");
    assert_eq!(
        parse_edgegrid("EG1-HMAC-SHA256 client_token=c;access_token=a;timestamp=t;nonce=n"),
        Err(Refusal::Malformed)
    );
    assert_eq!(parse_edgegrid("Basic abc"), Err(Refusal::Malformed));
}

#[test]
fn sigv4_authorization_parses_and_rejects_garbage() {
    let a = parse_sigv4(
        "AWS4-HMAC-SHA256 Credential=AKID/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc",
    )
    .unwrap();
    assert_eq!(a.access_key_id, "AKID");
    assert_eq!(a.scope, "20150830/us-east-1/service/aws4_request");
    assert_eq!(a.signed_headers, vec!["host", "x-amz-date"]);
    assert_eq!(parse_sigv4("Bearer x"), Err(Refusal::Malformed));
    assert_eq!(parse_sigv4("AWS4-HMAC-SHA256 Credential=a"), Err(Refusal::Malformed));
}
