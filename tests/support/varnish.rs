//! Private Varnish instances with the xkey vmod, in front of a tiny local origin.
//!
//! [`Varnish::start`] runs `varnishd -F -j none` on free loopback ports (listen and admin both
//! `127.0.0.1:0`, asked back through `varnishadm debug.listen_address`) with its own working
//! directory and tests/fixtures/varnish-xkey.vcl (a copy of shared/reference/varnish-xkey.vcl)
//! pointed at the [`Origin`]. Killed and waited for on drop.
//!
//! The [`Origin`] answers every GET with a body naming the path and how often it was fetched,
//! `Cache-Control: max-age=3600` and the `Surrogate-Key` header the test assigned to that path,
//! which the VCL turns into xkey tags.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cdn_doubles::{Reply, Server};

const VCL: &str = include_str!("../fixtures/varnish-xkey.vcl");

/// The origin behind Varnish.
pub struct Origin {
    pub server: Server,
    /// Surrogate keys by path (space-separated, as the header carries them).
    pub keys: Arc<Mutex<HashMap<String, String>>>,
    /// Fetches by path.
    pub fetches: Arc<Mutex<HashMap<String, u64>>>,
}

impl Origin {
    pub fn start() -> Origin {
        let keys: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let fetches: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let (k, f) = (keys.clone(), fetches.clone());
        let server = Server::start(move |req| {
            let n = {
                let mut f = f.lock().unwrap();
                let n = f.entry(req.path.clone()).or_insert(0);
                *n += 1;
                *n
            };
            let mut reply =
                Reply::text(200, &format!("{} fetch {n}\n", req.path)).with_header("Cache-Control", "max-age=3600");
            if let Some(keys) = k.lock().unwrap().get(&req.path) {
                reply = reply.with_header("Surrogate-Key", keys);
            }
            reply
        });
        Origin { server, keys, fetches }
    }

    pub fn tag(&self, path: &str, keys: &str) {
        self.keys.lock().unwrap().insert(path.to_string(), keys.to_string());
    }

    pub fn fetches(&self, path: &str) -> u64 {
        self.fetches.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

pub struct Varnish {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// One answer through Varnish.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub x_cache: String,
    pub age: u64,
    pub body: String,
}

impl Varnish {
    pub fn start(origin_port: u16) -> Varnish {
        let dir = tempfile::tempdir().expect("temp dir for varnishd");
        let vcl = VCL.replace(".port = \"8080\"", &format!(".port = \"{origin_port}\""));
        assert!(vcl.contains(&origin_port.to_string()), "the fixture VCL names its backend port 8080");
        let vcl_path = dir.path().join("default.vcl");
        std::fs::write(&vcl_path, vcl).expect("write VCL");
        let workdir: PathBuf = dir.path().join("n");
        let log = std::fs::File::create(dir.path().join("varnishd.log")).expect("varnishd log");
        let child = Command::new("varnishd")
            .args(["-F", "-j", "none", "-a", "127.0.0.1:0", "-T", "127.0.0.1:0", "-s", "malloc,16m"])
            .arg("-n")
            .arg(&workdir)
            .arg("-f")
            .arg(&vcl_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start varnishd (apt install varnish varnish-modules): {e}"));
        let mut varnish = Varnish { port: 0, dir, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("varnishadm").arg("-n").arg(&workdir).arg("debug.listen_address").output();
            // "a0 127.0.0.1 35501"
            let port = out.ok().and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find_map(|l| l.split_whitespace().nth(2)?.parse::<u16>().ok())
            });
            if let Some(p) = port {
                if super::wait_for_port(p, Duration::from_secs(5)) {
                    varnish.port = p;
                    return varnish;
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(varnish.dir.path().join("varnishd.log")).unwrap_or_default();
                panic!("varnishd did not come up within 20 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A GET through the cache with the given `Host`.
    pub fn get(&self, host: &str, path: &str) -> Fetched {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect to varnish");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read varnish answer");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut headers = HashMap::new();
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        Fetched {
            status,
            x_cache: headers.get("x-cache").cloned().unwrap_or_default(),
            age: headers.get("age").and_then(|a| a.parse().ok()).unwrap_or(0),
            body: body.to_string(),
        }
    }
}

impl Drop for Varnish {
    fn drop(&mut self) {
        // SIGTERM first: the manager then stops its cache child (a grandchild of ours) too.
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
