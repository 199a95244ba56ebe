//! Certificates for the tests' https listeners.

use std::path::{Path, PathBuf};

/// Writes a self-signed certificate for `localhost` and its key into `dir` as `{name}.pem` and
/// `{name}.key`; returns their paths.
pub fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let paths = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&paths.0, cert.cert.pem()).expect("write the certificate");
    std::fs::write(&paths.1, cert.key_pair.serialize_pem()).expect("write the key");
    paths
}
