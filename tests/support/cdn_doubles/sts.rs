//! An AWS STS double serving `AssumeRoleWithWebIdentity` (API 2011-06-15) as documented: a form
//! POST with `Action`, `Version`, `RoleArn`, `RoleSessionName` and `WebIdentityToken`, answered
//! with an `AssumeRoleWithWebIdentityResponse` holding temporary credentials and their
//! `Expiration`, or an `ErrorResponse` (`InvalidIdentityToken`, `AccessDenied`,
//! `InvalidParameterValue`). Every key it issues is accepted by the CloudFront double it is
//! joined to, with its session token and until it expires.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use cdc_invalidator::config::Secret;
use cdc_invalidator::sink::cdn::sigv4;

use super::cloudfront::{CfKey, CfState, CloudFrontDouble};
use super::{Recorded, Reply, Server};

pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/cdc-invalidator-purge";

pub struct StsState {
    /// The web identity token STS accepts now (an identity provider's JWT).
    pub accepted_token: String,
    /// How long issued credentials last.
    pub lifetime: Duration,
    /// Successful exchanges: (access key id, session name).
    pub issued: Vec<(String, String)>,
    /// Refused calls.
    pub refused: usize,
}

pub struct StsDouble {
    pub server: Server,
    pub state: Arc<Mutex<StsState>>,
}

impl StsDouble {
    /// Issues credentials lasting `lifetime` for `token`, accepted by `cloudfront`.
    pub fn start(cloudfront: &CloudFrontDouble, token: &str, lifetime: Duration) -> StsDouble {
        let state = Arc::new(Mutex::new(StsState {
            accepted_token: token.to_string(),
            lifetime,
            issued: Vec::new(),
            refused: 0,
        }));
        let (s, cf) = (state.clone(), cloudfront.state.clone());
        let server = Server::start(move |r| sts(&s, &cf, r));
        StsDouble { server, state }
    }

    pub fn endpoint(&self) -> String {
        self.server.url()
    }

    pub fn state(&self) -> MutexGuard<'_, StsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    Reply {
        status,
        headers: vec![("Content-Type".into(), "text/xml".into())],
        body: format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>"
        ),
    }
}

/// `2026-11-29T03:00:00Z` from SigV4's `20261129T030000Z`.
fn iso8601(at: SystemTime) -> String {
    let d = sigv4::amz_date(at);
    format!("{}-{}-{}T{}:{}:{}Z", &d[0..4], &d[4..6], &d[6..8], &d[9..11], &d[11..13], &d[13..15])
}

fn form(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            let decode = |s: &str| String::from_utf8_lossy(&sigv4::percent_decode(&s.replace('+', " "))).into_owned();
            (decode(k), decode(v))
        })
        .collect()
}

fn sts(state: &Mutex<StsState>, cloudfront: &Mutex<CfState>, r: Recorded) -> Reply {
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let params = form(&r.body);
    let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if r.method != "POST" || get("Action") != Some("AssumeRoleWithWebIdentity") || get("Version") != Some("2011-06-15")
    {
        st.refused += 1;
        return error(400, "InvalidAction", "Could not find operation for this request.");
    }
    if get("RoleArn") != Some(ROLE_ARN) {
        st.refused += 1;
        return error(403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity");
    }
    let session = get("RoleSessionName").unwrap_or_default().to_string();
    if session.len() < 2 || session.len() > 64 {
        st.refused += 1;
        return error(400, "InvalidParameterValue", "RoleSessionName must be 2 to 64 characters.");
    }
    if get("WebIdentityToken") != Some(st.accepted_token.as_str()) {
        st.refused += 1;
        return error(400, "InvalidIdentityToken", "The web identity token that was passed could not be validated.");
    }
    let n = st.issued.len() + 1;
    let credentials = sigv4::Credentials {
        access_key_id: format!("ASIATESTSTS{n:09}"),
        secret_access_key: Secret::new(format!("sts-secret-{n}-{:x}", rand_part(n))),
        session_token: Some(Secret::new(format!("FwoGZXIvYXdzEXAMPLE-session-{n}"))),
    };
    let expires = SystemTime::now() + st.lifetime;
    // The document says the second; the double expires the key at that second too.
    let expiration = iso8601(expires);
    let expires_at = SystemTime::UNIX_EPOCH
        + Duration::from_secs(expires.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
    st.issued.push((credentials.access_key_id.clone(), session.clone()));
    cloudfront
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys
        .push(CfKey { credentials: credentials.clone(), expires: Some(expires_at) });
    Reply {
        status: 200,
        headers: vec![("Content-Type".into(), "text/xml".into())],
        body: format!(
            "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
<AssumeRoleWithWebIdentityResult>\
<SubjectFromWebIdentityToken>system:serviceaccount:cdc:invalidator</SubjectFromWebIdentityToken>\
<Audience>sts.amazonaws.com</Audience>\
<AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/cdc-invalidator-purge/{session}</Arn><AssumedRoleId>AROACLKWSDQRAOEXAMPLE:{session}</AssumedRoleId></AssumedRoleUser>\
<Credentials><SessionToken>{}</SessionToken><SecretAccessKey>{}</SecretAccessKey><Expiration>{expiration}</Expiration><AccessKeyId>{}</AccessKeyId></Credentials>\
<Provider>arn:aws:iam::123456789012:oidc-provider/oidc.eks.example</Provider>\
</AssumeRoleWithWebIdentityResult>\
<ResponseMetadata><RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId></ResponseMetadata>\
</AssumeRoleWithWebIdentityResponse>",
            credentials.session_token.as_ref().map(|t| t.expose()).unwrap_or_default(),
            credentials.secret_access_key.expose(),
            credentials.access_key_id
        ),
    }
}

/// A different secret per key, without a random source the tests would have to seed.
fn rand_part(n: usize) -> u64 {
    let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    t ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}
