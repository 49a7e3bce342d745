//! A test certificate authority made with the `openssl` CLI at test time, and
//! TLS clients (rustls) that trust it: for the node's `http.tls_*` and
//! `grpc.tls_*` listeners, and for Redis over TLS (`redis_tls.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl (the tests need the openssl CLI)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (P-256) in a temp dir; [`TestCa::issue`] makes server certificates
/// for `localhost` and 127.0.0.1 signed by it, [`TestCa::issue_for`] client
/// ones. The node's listener tests and the Redis TLS tests use it.
pub struct TestCa {
    dir: tempfile::TempDir,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Issued {
    /// `tls_cert` and `tls_key` lines of a listener (`[http]` or `[grpc]`).
    pub fn listener_toml(&self) -> String {
        format!("tls_cert = {:?}\ntls_key = {:?}\n", self.cert, self.key)
    }

    /// The leaf certificate's DER, to compare with what a handshake presents.
    pub fn der(&self) -> Vec<u8> {
        CertificateDer::pem_file_iter(&self.cert)
            .expect("reading the certificate")
            .next()
            .expect("a certificate in the file")
            .expect("a PEM certificate")
            .to_vec()
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        Self::named("fanfare test CA")
    }

    /// A new CA with common name `name` (distinct CAs in one test).
    pub fn named(name: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("creating a temp dir");
        let subj = format!("/CN={name}");
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &subj,
            ],
        );
        TestCa { dir }
    }

    /// A fresh key pair and a server certificate for it with common name
    /// `name`.
    pub fn issue(&self, name: &str) -> Issued {
        self.issue_for(name, "serverAuth")
    }

    /// Like [`TestCa::issue`] for the extended key `usage` (`clientAuth` for
    /// a client certificate, `serverAuth,clientAuth` for one a server also
    /// presents as a client, as Redis does on its cluster bus).
    pub fn issue_for(&self, name: &str, usage: &str) -> Issued {
        let (key, csr, cert, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.cnf"),
        );
        std::fs::write(
            self.dir.path().join(&ext),
            format!(
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature\nextendedKeyUsage={usage}\n"
            ),
        )
        .expect("writing the extension file");
        let subj = format!("/CN={name}");
        openssl(
            self.dir.path(),
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &subj,
            ],
        );
        openssl(
            self.dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
        Issued { cert: self.dir.path().join(cert), key: self.dir.path().join(key) }
    }

    /// The CA certificate (PEM), for a node's `*_ca` setting.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A client configuration trusting only this CA, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.dir.path().join("ca.pem")).expect("CA file") {
            roots.add(c.expect("CA certificate")).expect("adding the CA");
        }
        #[allow(deprecated)] // the node's provider too (src/tls.rs)
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// A TLS connection to `127.0.0.1:port` verified as `localhost`.
pub async fn connect(
    config: Arc<ClientConfig>,
    port: u16,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").expect("a valid name");
    TlsConnector::from(config).connect(name, tcp).await
}

/// The leaf certificate (DER) a server on `port` presents in a new full
/// handshake (a resumed session would show the certificate it began with).
pub async fn presented_certificate(config: Arc<ClientConfig>, port: u16) -> Vec<u8> {
    let mut config = (*config).clone();
    config.resumption = rustls::client::Resumption::disabled();
    let tls = connect(Arc::new(config), port).await.expect("TLS handshake");
    let (_, conn) = tls.get_ref();
    conn.peer_certificates().expect("the server presented certificates")[0].to_vec()
}

/// A unary gRPC call over TLS with ALPN `h2`: the response's headers and
/// its trailers (or the headers again for a trailers-only answer).
pub async fn grpc_call(
    config: Arc<ClientConfig>,
    port: u16,
    path: &str,
    message: &[u8],
    metadata: &[(&str, &str)],
) -> (http::HeaderMap, http::HeaderMap, bytes::Bytes) {
    let tls = connect(config, port).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2 negotiated");
    let (mut h2, conn) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::post(format!("https://localhost:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in metadata {
        req = req.header(*k, *v);
    }
    let (resp, mut send) = h2.send_request(req.body(()).expect("request"), false).expect("send");
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    send.send_data(framed.into(), true).expect("send data");
    let resp = resp.await.expect("response");
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut data = bytes::BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_else(|| headers.clone());
    (headers, trailers, data.freeze())
}
