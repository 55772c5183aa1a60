//! The signed CDN providers: SigV4 and EdgeGrid against their published test vectors, and the
//! CloudFront and Akamai sinks against local doubles that verify those signatures and enforce
//! the documented limits.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cdc_invalidator::config::Secret;
use cdc_invalidator::sink::cdn::{edgegrid, sigv4};

fn fixtures(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(kind)
}

fn suite_credentials() -> sigv4::Credentials {
    sigv4::Credentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        session_token: None,
    }
}

/// A `.req` file: request line, headers (`Name:value`, a name may repeat), blank line, body.
struct SuiteRequest {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn parse_req(text: &str) -> SuiteRequest {
    let (head, body) = text.split_once("\n\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let request_line = lines.next().expect("request line");
    let method = request_line.split(' ').next().unwrap().to_string();
    // The target runs up to the last " HTTP/1.1" (it may hold spaces).
    let target = request_line[method.len() + 1..].rsplit_once(" HTTP/").unwrap().0;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.to_string(), v.to_string())
        })
        .collect();
    SuiteRequest { method, path: path.into(), query: query.into(), headers, body: body.as_bytes().to_vec() }
}

#[test]
fn sigv4_matches_the_aws_test_suite() {
    let dir = fixtures("sigv4");
    let mut groups: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    groups.sort();
    assert!(groups.len() >= 5, "at least five vectors: found {}", groups.len());
    for group in groups {
        let name = group.file_name().unwrap().to_str().unwrap().to_string();
        let read = |ext: &str| std::fs::read_to_string(group.join(format!("{name}.{ext}"))).unwrap();
        let req = parse_req(&read("req"));
        let signed = sigv4::sign(
            &suite_credentials(),
            "us-east-1",
            "service",
            &sigv4::Request {
                method: &req.method,
                path: &req.path,
                query: &req.query,
                headers: &req.headers,
                payload: &req.body,
            },
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(signed.canonical_request, read("creq"), "{name}: canonical request");
        assert_eq!(signed.string_to_sign, read("sts"), "{name}: string to sign");
        assert_eq!(signed.authorization, read("authz"), "{name}: Authorization");

        // The verifier the CloudFront double uses accepts exactly this request...
        let mut sent = req.headers.clone();
        sent.push(("Authorization".into(), signed.authorization.clone()));
        let verify = |headers: &[(String, String)], body: &[u8], creds: &sigv4::Credentials| {
            sigv4::verify(creds, "us-east-1", "service", &req.method, &req.path, &req.query, headers, body)
        };
        assert_eq!(verify(&sent, &req.body, &suite_credentials()), Ok(()), "{name}: verify");
        // ...and refuses it with another secret, another body or a changed signed header.
        let wrong = sigv4::Credentials { secret_access_key: Secret::new("not-the-secret"), ..suite_credentials() };
        assert_eq!(verify(&sent, &req.body, &wrong), Err(sigv4::SigV4Error::Mismatch), "{name}: wrong secret");
        assert_eq!(verify(&sent, b"tampered", &suite_credentials()), Err(sigv4::SigV4Error::Mismatch), "{name}: body");
        let mut moved = sent.clone();
        for (n, v) in moved.iter_mut() {
            if n.eq_ignore_ascii_case("x-amz-date") {
                *v = "20150830T123601Z".into();
            }
        }
        assert!(verify(&moved, &req.body, &suite_credentials()).is_err(), "{name}: date changed after signing");
    }
}

#[test]
fn sigv4_verify_refuses_unsigned_host_and_unknown_keys() {
    let headers = vec![
        ("Host".to_string(), "example.amazonaws.com".to_string()),
        ("X-Amz-Date".to_string(), "20150830T123600Z".to_string()),
    ];
    let request = sigv4::Request { method: "GET", path: "/", query: "", headers: &headers[1..], payload: b"" };
    // Signing without a host header is refused outright.
    assert_eq!(
        sigv4::sign(&suite_credentials(), "us-east-1", "service", &request),
        Err(sigv4::SigV4Error::MissingHeader("host"))
    );
    let signed =
        sigv4::sign(&suite_credentials(), "us-east-1", "service", &sigv4::Request { headers: &headers, ..request })
            .unwrap();
    let mut sent = headers.clone();
    sent.push(("Authorization".into(), signed.authorization.replace("AKIDEXAMPLE", "AKIDOTHER")));
    assert_eq!(
        sigv4::verify(&suite_credentials(), "us-east-1", "service", "GET", "/", "", &sent, b""),
        Err(sigv4::SigV4Error::UnknownKey)
    );
    // A signature for another region is refused even with the right key.
    let mut sent = headers.clone();
    sent.push(("Authorization".into(), signed.authorization.clone()));
    assert!(matches!(
        sigv4::verify(&suite_credentials(), "eu-west-1", "service", "GET", "/", "", &sent, b""),
        Err(sigv4::SigV4Error::Mismatch | sigv4::SigV4Error::WrongScope(_))
    ));
}

#[derive(serde::Deserialize)]
struct EdgeGridData {
    base_url: String,
    access_token: String,
    client_token: String,
    client_secret: String,
    max_body: usize,
    headers_to_sign: Vec<String>,
    nonce: String,
    timestamp: String,
    sign_key_test: String,
    tests: Vec<EdgeGridCase>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct EdgeGridCase {
    test_name: String,
    request: EdgeGridRequest,
    expected_authorization: String,
}

#[derive(serde::Deserialize)]
struct EdgeGridRequest {
    method: String,
    path: String,
    #[serde(default)]
    data: String,
    #[serde(default)]
    headers: Vec<std::collections::BTreeMap<String, String>>,
}

#[test]
fn edgegrid_matches_akamai_test_data() {
    let text = std::fs::read_to_string(fixtures("edgegrid").join("testdata.json")).unwrap();
    let data: EdgeGridData = serde_json::from_str(&text).unwrap();
    assert_eq!(edgegrid::signing_key(&data.client_secret, &data.timestamp), data.sign_key_test);
    let creds = edgegrid::Credentials {
        client_token: data.client_token.clone(),
        client_secret: Secret::new(data.client_secret.clone()),
        access_token: data.access_token.clone(),
    };
    let settings = edgegrid::Settings { headers_to_sign: data.headers_to_sign.clone(), max_body: data.max_body };
    let host = data.base_url.trim_start_matches("https://").trim_end_matches('/');
    assert!(data.tests.len() >= 10);
    for case in &data.tests {
        let headers: Vec<(String, String)> =
            case.request.headers.iter().flat_map(|h| h.iter().map(|(n, v)| (n.clone(), v.clone()))).collect();
        let request = edgegrid::Request {
            method: &case.request.method,
            scheme: "https",
            host,
            path_and_query: &case.request.path,
            headers: &headers,
            body: case.request.data.as_bytes(),
        };
        let header = edgegrid::authorization(&creds, &settings, &request, &data.timestamp, &data.nonce);
        assert_eq!(header, case.expected_authorization, "{}", case.test_name);

        // The Akamai double's check accepts it at the vector's time, and refuses it with
        // another secret or a changed path.
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_395_430_461); // 20140321T19:34:21Z
        let mut sent = headers.clone();
        sent.push(("Authorization".into(), header.clone()));
        let signed = edgegrid::Request { headers: &sent, ..request };
        assert!(
            edgegrid::verify(&creds, &settings, &signed, at, Duration::from_secs(60)).is_ok(),
            "{}",
            case.test_name
        );
        let wrong = edgegrid::Credentials { client_secret: Secret::new("another-secret"), ..creds.clone() };
        assert_eq!(
            edgegrid::verify(&wrong, &settings, &signed, at, Duration::from_secs(60)),
            Err(edgegrid::EdgeGridError::Mismatch),
            "{}",
            case.test_name
        );
        let moved = edgegrid::Request { path_and_query: "/other", ..signed };
        assert_eq!(
            edgegrid::verify(&creds, &settings, &moved, at, Duration::from_secs(60)),
            Err(edgegrid::EdgeGridError::Mismatch)
        );
        // A replay long after the timestamp is stale.
        assert_eq!(
            edgegrid::verify(&creds, &settings, &signed, at + Duration::from_secs(3600), Duration::from_secs(60)),
            Err(edgegrid::EdgeGridError::Stale)
        );
    }
}
