//! Empty library target: lets `lb-agent` list this crate as a build-dependency (so cargo rebuilds
//! the agent when the program changes) without compiling the XDP binary for the host.
#![no_std]
