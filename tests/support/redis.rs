//! Private redis-server instances.
