//! Test harness: private service instances on free loopback ports, stopped on drop.
#![allow(dead_code)]

pub mod cdn_doubles;
pub mod daemon;
pub mod events;
pub mod kafka;
pub mod postgres;
pub mod redis;
pub mod registry;
pub mod signatures;
pub mod tansu;
pub mod varnish;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; the race with other processes is
/// accepted for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local addr").port()
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
