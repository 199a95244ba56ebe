//! rustls for https listeners: PEM loading (errors name the file), a certificate resolver that
//! picks by SNI (exact and wildcard names, as the certificates themselves state them), reload
//! of replaced certificate files, optional client certificates, and the TLS client for
//! `backend_protocol: https`.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tracing::{info, warn};

use crate::config::{CertificatePair, TlsConfig};

/// How often certificate files are checked for replacement.
const RELOAD_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {message}", path.display())]
    Cert { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    #[error("building the TLS configuration: {0}")]
    Config(String),
}

impl TlsError {
    /// Whether the private key (rather than the certificate) is at fault.
    pub fn is_key(&self) -> bool {
        matches!(self, TlsError::Key { .. })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Loads a PEM chain (leaf first) and its PEM key (PKCS#8, PKCS#1 RSA or SEC1 EC), checking
/// that they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: cert.into(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| cert_err(format!("not a PEM certificate chain: {}", pem_problem(&e))))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate in the file".into()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.into(),
        message: format!(
            "no PEM private key (PKCS#8, RSA or EC): {}",
            pem_problem(&e)
        ),
    })?;
    webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| cert_err(format!("the first certificate does not parse ({e})")))?;
    CertifiedKey::from_der(chain, der, &ring::default_provider()).map_err(|e| TlsError::Key {
        path: key.into(),
        message: format!("unusable with {}: {e}", cert.display()),
    })
}

/// The PEM parser's complaint in words (its own Display prints markers as byte lists).
fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "no `-----END {}-----` line",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => {
            format!("malformed BEGIN line `{}`", String::from_utf8_lossy(line))
        }
        Error::NoItemsFound => "nothing of that kind in the file".into(),
        other => other.to_string(),
    }
}

/// A PEM CA bundle.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let err = |message: String| TlsError::Cert {
        path: path.into(),
        message,
    };
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(path).map_err(|e| err(pem_problem(&e)))? {
        roots
            .add(der.map_err(|e| err(pem_problem(&e)))?)
            .map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(roots)
}

/// Picks the first configured certificate valid for the client's SNI name (wildcards as the
/// certificate states them); the first certificate when none is, or without SNI.
#[derive(Debug)]
pub struct SniResolver {
    pairs: Vec<CertificatePair>,
    loaded: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    keys: Vec<Arc<CertifiedKey>>,
    /// What the files were when the keys were loaded, to notice replaced ones.
    stamps: Vec<Option<Stamp>>,
}

/// A file's identity and change times: a file renamed over it (a new inode), a symlink
/// switched to another, or one rewritten in place (its ctime moves even when a tool such as
/// `cp -p`, tar or rsync sets its mtime back) all differ.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The file's stamp, following symlinks.
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

impl SniResolver {
    pub fn new(pairs: &[CertificatePair]) -> Result<Self, TlsError> {
        let loaded = Self::load(pairs)?;
        Ok(Self {
            pairs: pairs.to_vec(),
            loaded: RwLock::new(loaded),
        })
    }

    fn stamps(pairs: &[CertificatePair]) -> Vec<Option<Stamp>> {
        pairs
            .iter()
            .flat_map(|p| [Stamp::of(&p.cert), Stamp::of(&p.key)])
            .collect()
    }

    fn load(pairs: &[CertificatePair]) -> Result<Loaded, TlsError> {
        let stamps = Self::stamps(pairs);
        let keys = pairs
            .iter()
            .map(|p| load_certified_key(&p.cert, &p.key).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Loaded { keys, stamps })
    }

    /// Reloads when a file changed. A half-written or bad replacement keeps the old
    /// certificates (and is retried at the next poll).
    fn reload_if_changed(&self) {
        let stamps = Self::stamps(&self.pairs);
        if self.loaded.read().is_ok_and(|l| l.stamps == stamps) {
            return;
        }
        match Self::load(&self.pairs) {
            Ok(loaded) => {
                if let Ok(mut l) = self.loaded.write() {
                    *l = loaded;
                }
                info!(certificates = self.pairs.len(), "certificates reloaded");
            }
            Err(e) => warn!(error = %e, "certificate reload failed; keeping the loaded ones"),
        }
    }

    /// Polls the files until the resolver is no longer used.
    pub fn watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_POLL);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(r) => r.reload_if_changed(),
                    None => return,
                }
            }
        });
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.loaded.read().ok()?;
        let by_name = hello.server_name().and_then(|name| {
            let name = ServerName::try_from(name).ok()?;
            loaded.keys.iter().find(|k| {
                webpki::EndEntityCert::try_from(&k.cert[0])
                    .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
            })
        });
        by_name.or_else(|| loaded.keys.first()).cloned()
    }
}

/// The server configuration of an https listener: TLS 1.2 and 1.3, ALPN h2 and http/1.1,
/// session tickets and a session cache for resumption.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let resolver = Arc::new(SniResolver::new(&tls.certificates)?);
    resolver.watch();
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = ring::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// The client configuration for https backends. Backend certificates are not verified (the
/// vendors' default for full-path HTTPS: backends commonly carry self-signed certificates);
/// signatures still are, so the handshake itself is sound.
pub fn backend_client_config() -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(AnyServerCert(provider.clone()));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

/// A client configuration that verifies server certificates against the CA bundle at `ca`
/// (health checks that ask for it).
pub fn verifying_client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_root_certificates(load_roots(ca)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a self-signed certificate for `name` and its key at `cert` and `key`.
    fn write_pair(name: &str, cert: &Path, key: &Path) {
        let k = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&k)
            .unwrap();
        std::fs::write(cert, c.pem()).unwrap();
        std::fs::write(key, k.serialize_pem()).unwrap();
    }

    #[test]
    fn files_replaced_with_their_old_modification_time_are_reloaded() {
        let dir = std::env::temp_dir().join(format!("lb-tls-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pair = CertificatePair {
            cert: dir.join("site.pem"),
            key: dir.join("site.key"),
        };
        write_pair("one.example", &pair.cert, &pair.key);
        let resolver = SniResolver::new(std::slice::from_ref(&pair)).unwrap();
        let served = || resolver.loaded.read().unwrap().keys[0].cert[0].clone();
        let first = served();
        // As `cp -p`, tar or rsync leave them: new files renamed over the old ones, with
        // the old modification time.
        let old = std::fs::metadata(&pair.cert).unwrap().modified().unwrap();
        let (cert, key) = (dir.join("new.pem"), dir.join("new.key"));
        write_pair("two.example", &cert, &key);
        for (from, to) in [(&cert, &pair.cert), (&key, &pair.key)] {
            std::fs::File::options()
                .write(true)
                .open(from)
                .unwrap()
                .set_modified(old)
                .unwrap();
            std::fs::rename(from, to).unwrap();
        }
        resolver.reload_if_changed();
        let second = served();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_ne!(first, second);
    }
}
