//! Test harness: network namespaces joined by veth pairs, in-namespace TCP servers and clients,
//! and the agent as a child process. Everything a test creates has a unique name and is removed
//! on drop, also when the test panics, so tests can run concurrently and leave nothing behind.
//!
//! Needs root (network namespaces, XDP). Used by the end-to-end tests, the packet fixtures and
//! `cargo xtask demo`.

pub mod flood;
pub mod maps;
pub mod netns;
pub mod nginx;
pub mod procfs;
pub mod tls;
pub mod topology;

pub use netns::Netns;
pub use topology::{Agent, Topology};
