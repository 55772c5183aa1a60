//! The Redis sink against a real redis-server.
