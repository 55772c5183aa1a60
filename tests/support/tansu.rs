//! The Tansu broker, out of process.
