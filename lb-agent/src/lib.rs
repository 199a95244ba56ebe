//! lb-agent: loads the XDP FullNAT program, turns a YAML topology into its map contents and
//! keeps them there.
pub mod admin;
pub mod alloc;
pub mod batch;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dataplane;
pub mod gc;
pub mod health;
pub mod maglev;
pub mod netif;
pub mod overrides;
pub mod plan;
pub mod proxy;
pub mod reset;
pub mod state;
pub mod stats;
mod sys_bpf;
pub mod wrr;
