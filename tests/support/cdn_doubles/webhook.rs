//! An in-house cache's webhook receiver: checks the HMAC signature
//! (`t=<unix>,v1=<hex HMAC-SHA256(secret, t + "." + body)>`), records accepted batches,
//! answers 401 to a bad signature, and can storm.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Recorded, Reply, Server, Shared, Storm};

pub const SECRET: &str = "webhook-test-secret";

#[derive(Debug, Default)]
pub struct State {
    pub storm: Option<Storm>,
    /// Answers this many signed purges with 503 before accepting any: a failure burst that,
    /// unlike a [`Storm`], does not end by the clock before a slow (loaded) daemon arrives.
    pub fail_first: u32,
    /// How long each purge (POST) takes to answer: a slow receiver. Requests are answered one
    /// at a time, so a slow one also holds those behind it.
    pub delay: Option<std::time::Duration>,
    pub log: Vec<(Instant, u16)>,
    pub keys: Vec<String>,
    pub urls: Vec<String>,
}

pub struct WebhookDouble {
    pub server: Server,
    pub state: Shared<State>,
}

impl WebhookDouble {
    pub fn start() -> WebhookDouble {
        let state: Shared<State> = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let server = Server::start(move |req| {
            let delay = s.lock().unwrap().delay.filter(|_| req.method == "POST");
            if let Some(delay) = delay {
                std::thread::sleep(delay);
            }
            let mut st = s.lock().unwrap();
            let reply = handle(&mut st, &req);
            st.log.push((req.at, reply.status));
            reply
        });
        WebhookDouble { server, state }
    }

    pub fn url(&self) -> String {
        format!("{}/hooks/purge", self.server.url())
    }
}

/// Checks a signature header the way a receiver should.
pub fn verify(header: &str, body: &[u8], secret: &str) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    let Ok(expected) =
        (0..v1.len() / 2).map(|i| u8::from_str_radix(&v1[2 * i..2 * i + 2], 16)).collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    mac.verify_slice(&expected).is_ok()
}

fn handle(st: &mut State, req: &Recorded) -> Reply {
    let signed = req.header("x-cdc-invalidator-signature").is_some_and(|h| verify(h, &req.body, SECRET));
    if !signed {
        return Reply::text(401, "bad signature");
    }
    if let Some(storm) = st.storm.filter(|s| s.active(req.at)) {
        return Reply::text(storm.status, "busy").with_header("Retry-After", 1);
    }
    if st.fail_first > 0 {
        st.fail_first -= 1;
        return Reply::text(503, "busy").with_header("Retry-After", 1);
    }
    let Some(body) = req.json() else { return Reply::text(400, "not JSON") };
    let list = |k: &str| -> Vec<String> {
        body.get(k)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    if list("surrogate_keys").iter().any(|k| k.contains("refused")) {
        return Reply::text(422, "refused key");
    }
    st.keys.extend(list("surrogate_keys"));
    st.urls.extend(list("urls"));
    Reply::text(204, "")
}
