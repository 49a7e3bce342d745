//! TLS for the node's listeners (`http.tls_*`, `grpc.tls_*`): rustls with a
//! certificate that can be swapped while the node runs (SIGHUP).
//!
//! Each listener has a [`Certificate`]: the pair of PEM files it was
//! configured with and the key pair loaded from them. A handshake asks the
//! resolver for the current key pair; a reload replaces it for the
//! handshakes that follow, while established connections keep the session
//! keys they negotiated (a certificate is only used during the handshake).
//! A reload that fails (missing file, bad PEM, key not matching the
//! certificate) keeps the old pair and reports which key's file is at fault.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// The certificate and key files of one listener, and the pair currently
/// served. Cheap to share: handshakes take a read lock for the time of an
/// `Arc` clone; the lock is a `std` one because nothing awaits under it.
#[derive(Debug)]
pub struct Certificate {
    /// Config keys, for messages: e.g. `http.tls_cert`, `http.tls_key`.
    keys: (&'static str, &'static str),
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificate {
    /// Loads the pair; the error names the config key whose file is at fault.
    pub fn load(
        keys: (&'static str, &'static str),
        cert_path: &Path,
        key_path: &Path,
    ) -> anyhow::Result<Arc<Certificate>> {
        let pair = load_pair(keys, cert_path, key_path)?;
        Ok(Arc::new(Certificate {
            keys,
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new(Arc::new(pair)),
        }))
    }

    /// Reads the files again and serves the new pair to handshakes from now
    /// on; on error the old pair stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let pair = load_pair(self.keys, &self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
        Ok(())
    }

    /// The config key of the certificate file (`http.tls_cert`), for logs.
    pub fn cert_key(&self) -> &'static str {
        self.keys.0
    }

    /// A TLS acceptor for a listener speaking `alpn` (e.g. `h2` for gRPC).
    pub fn acceptor(self: &Arc<Self>, alpn: &[&[u8]]) -> TlsAcceptor {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsAcceptor::from(Arc::new(config))
    }
}

/// The certificates of the HTTP and gRPC ports (`http.tls_*`, `grpc.tls_*`),
/// each when configured.
pub struct Certificates {
    pub http: Option<Arc<Certificate>>,
    pub grpc: Option<Arc<Certificate>>,
}

impl Certificates {
    /// Loads what the settings name; errors name the key.
    pub fn load(settings: &crate::config::Settings) -> anyhow::Result<Certificates> {
        let http = match settings.http_tls()? {
            Some((cert, key)) => {
                Some(Certificate::load(("http.tls_cert", "http.tls_key"), cert, key)?)
            }
            None => None,
        };
        let grpc = match settings.grpc_tls()? {
            Some((cert, key)) => {
                Some(Certificate::load(("grpc.tls_cert", "grpc.tls_key"), cert, key)?)
            }
            None => None,
        };
        Ok(Certificates { http, grpc })
    }
}

#[derive(Debug)]
struct Resolver(Arc<Certificate>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The *ring* provider: already in the build (hyper-rustls, for the outbound
/// proxies and webhooks), pure Rust plus assembly, no C toolchain. rustls
/// 0.23.48 deprecates it for lacking post-quantum key exchange (aws-lc-rs
/// has it, at the cost of a CMake build); switching is one line here.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

fn load_pair(
    (cert_key, key_key): (&'static str, &'static str),
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<CertifiedKey> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("{cert_key}: {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{cert_key}: {}: no PEM certificate in the file", cert_path.display());
    }
    // The error of a key file never quotes the file's content.
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| anyhow::anyhow!("{key_key}: {}: {e}", key_path.display()))?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        anyhow::anyhow!(
            "{key_key}: {}: not usable with the certificate of {cert_key}: {e}",
            key_path.display()
        )
    })
}
