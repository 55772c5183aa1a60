//! HTTP caches and CDNs: purges by surrogate key and URL.
//!
//! Signed providers: [`cloudfront`] (AWS SigV4, [`sigv4`]) and [`akamai`] (EdgeGrid,
//! [`edgegrid`]).

pub mod akamai;
pub mod cloudfront;
pub mod edgegrid;
pub mod sigv4;
/// Temporary: the shared pieces of branch `cdn` until it is merged.
mod standin;
