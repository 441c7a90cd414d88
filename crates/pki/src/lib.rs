//! The cluster's certificates (docs/threat-model.md): a certificate authority made at
//! `cluster init`, one certificate per node signed by it when the node joins, and the TLS
//! configurations built on them.
//!
//! - The **node port** (Raft, liveness, snapshots, console relay and the block protocol)
//!   takes only clients that present a certificate of the cluster's CA, and the caller then
//!   checks that certificate's fingerprint against the nodes of the cluster state: a node
//!   that was removed, or a certificate handed out for a join that never completed, gets
//!   nothing.
//! - The **API port** presents the node's certificate; users authenticate with tokens.
//! - A node that joins pins the CA by the fingerprint its join token carries, so it joins
//!   the cluster its admin meant and no other.
//!
//! Every node certificate names `NODE_NAME`, and clients verify servers against that name
//! rather than the address they dialled: the CA signs nothing but this cluster's nodes, so a
//! certificate of it is a node of the cluster, whatever address or host name reached it.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SignatureAlgorithm,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The name every node certificate carries, and the one clients check.
pub const NODE_NAME: &str = "converge-node";
/// ALPN of the block protocol on the node port.
pub const ALPN_BLOCKS: &[u8] = b"cvblk/1";
/// ALPN of HTTP/1.1 (peer requests on the node port, and the API).
pub const ALPN_HTTP: &[u8] = b"http/1.1";

const CA_NAME: &str = "converge cluster CA";
const KEY_ALGORITHM: &SignatureAlgorithm = &rcgen::PKCS_ECDSA_P256_SHA256;
/// An uncompressed P-256 point: 0x04, then X and Y.
const PUBLIC_KEY_BYTES: usize = 65;
const CA_YEARS: i32 = 30;
const NODE_YEARS: i32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("Making a key or certificate failed: {0}")]
    Generate(String),
    #[error("{what} is not usable: {reason}")]
    Invalid { what: String, reason: String },
    #[error("Cannot use {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn generate(e: impl std::fmt::Display) -> PkiError {
    PkiError::Generate(e.to_string())
}

fn invalid(what: &str, reason: impl std::fmt::Display) -> PkiError {
    PkiError::Invalid { what: what.to_string(), reason: reason.to_string() }
}

/// The SHA-256 of a certificate's DER bytes, as 64 hex digits: how the cluster state names
/// a node's certificate and a join token names the CA.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// The fingerprint of the first certificate in `pem`.
pub fn fingerprint_pem(pem: &str) -> Result<String, PkiError> {
    Ok(fingerprint(&cert_from_pem(pem, "a certificate")?))
}

fn cert_from_pem(pem: &str, what: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| invalid(what, e))
}

/// A new cluster CA: its certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct NewCa {
    pub cert_pem: String,
    pub key_pem: String,
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    1970 + (secs / 31_556_952) as i32
}

/// The CA's own parameters: also what rebuilds its issuer from the key alone.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + CA_YEARS, 1, 1);
    params
}

/// Makes the CA of a new cluster.
pub fn new_ca() -> Result<NewCa, PkiError> {
    let key = KeyPair::generate_for(KEY_ALGORITHM).map_err(generate)?;
    let cert = ca_params().self_signed(&key).map_err(generate)?;
    Ok(NewCa { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A node's public key as it travels in a join request.
struct NodePublicKey<'a>(&'a [u8]);

impl PublicKeyData for NodePublicKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        KEY_ALGORITHM
    }
}

/// Signs the certificate of node `node_id` for `public_key` (an uncompressed P-256 point),
/// valid for `NODE_NAME` and `addresses`. Returns it as PEM.
pub fn sign_node(ca_key_pem: &str, node_id: u64, addresses: &[IpAddr], public_key: &[u8]) -> Result<String, PkiError> {
    if public_key.len() != PUBLIC_KEY_BYTES || public_key[0] != 0x04 {
        return Err(invalid("the node's public key", "not an uncompressed P-256 point"));
    }
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| invalid("the cluster CA's key", e))?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("converge node {node_id}"));
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let node_name = NODE_NAME.try_into().map_err(generate)?;
    params.subject_alt_names = std::iter::once(SanType::DnsName(node_name))
        .chain(addresses.iter().filter(|a| !a.is_unspecified()).map(|a| SanType::IpAddress(*a)))
        .collect();
    let mut serial = [0u8; 16];
    serial.copy_from_slice(&Sha256::digest([public_key, &node_id.to_be_bytes()].concat())[..16]);
    serial[0] &= 0x7f;
    params.serial_number = Some(serial.to_vec().into());
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + NODE_YEARS, 1, 1);
    let cert = params.signed_by(&NodePublicKey(public_key), &issuer).map_err(generate)?;
    Ok(cert.pem())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| invalid("the cluster CA certificate", e))?;
    Ok(Arc::new(roots))
}

/// Whether a certificate, by its fingerprint, is a node's of the cluster now (the cluster
/// state says; set once the node has one).
#[derive(Default)]
pub struct Members(RwLock<Option<MemberCheck>>);

type MemberCheck = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Members")
    }
}

impl Members {
    /// True until a check is set (a node port has nothing to serve before).
    fn admits(&self, cert_sha256: &str) -> bool {
        self.0.read().expect("members lock").as_ref().is_none_or(|check| check(cert_sha256))
    }
}

/// Checks a server's chain against the cluster CA, for `NODE_NAME` whatever name was dialled.
#[derive(Debug)]
struct ClusterServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// Set when the CA is known only by its fingerprint (a node joining): the CA must then be
    /// in the chain the server sends, and is checked against this.
    pinned: Option<String>,
    /// Set for a node calling another: the server's certificate must also be a member's, not
    /// merely one of the CA (a removed node's, or one handed out to a join that never
    /// completed).
    members: Option<Arc<Members>>,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(NODE_NAME).expect("a valid DNS name");
        let Some(pin) = &self.pinned else {
            let verified = self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)?;
            if self.members.as_ref().is_some_and(|m| !m.admits(&fingerprint(end_entity))) {
                return Err(rustls::Error::General("the server's certificate is no node's of this cluster".into()));
            }
            return Ok(verified);
        };
        let ca = intermediates.iter().find(|c| fingerprint(c) == *pin).ok_or_else(|| {
            rustls::Error::General("the server's CA is not the one the join token names: another cluster".into())
        })?;
        let roots = roots(&ca.clone().into_owned()).map_err(|e| rustls::Error::General(e.to_string()))?;
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn server_verifier(
    ca: &CertificateDer<'static>,
    pinned: Option<String>,
    members: Option<Arc<Members>>,
) -> Result<Arc<ClusterServerVerifier>, PkiError> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(|e| invalid("the cluster CA certificate", e))?;
    Ok(Arc::new(ClusterServerVerifier { inner, pinned, members }))
}

fn client_builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
}

/// A client of the API that trusts the cluster CA in `ca_pem` (the CLI off the node).
pub fn api_client(ca_pem: &str) -> Result<ClientConfig, PkiError> {
    let ca = cert_from_pem(ca_pem, "the cluster CA certificate")?;
    let mut config = client_builder()
        .dangerous()
        .with_custom_certificate_verifier(server_verifier(&ca, None, None)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP.to_vec()];
    Ok(config)
}

/// A client of the API for a node about to join: it trusts the server only if the chain it
/// presents holds a CA of fingerprint `ca_sha256` that signed the server's certificate.
pub fn joining_client(ca_sha256: &str) -> Result<ClientConfig, PkiError> {
    // The builder needs some root; the pin decides.
    let placeholder = cert_from_pem(&new_ca()?.cert_pem, "a placeholder CA")?;
    let verifier = server_verifier(&placeholder, Some(ca_sha256.to_ascii_lowercase()), None)?;
    let mut config = client_builder().dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP.to_vec()];
    Ok(config)
}

/// What a node with a certificate serves and connects with.
#[derive(Debug)]
pub struct Material {
    pub ca_pem: String,
    /// The fingerprints of the CA and of this node's own certificate.
    pub ca_sha256: String,
    pub cert_sha256: String,
    /// The node port: clients must present a certificate of the CA.
    pub node_server: Arc<ServerConfig>,
    /// Connections to other nodes' node ports, for the block protocol and for HTTP.
    pub blocks_client: Arc<ClientConfig>,
    pub http_client: ClientConfig,
    /// The API port: the node's certificate and the CA, no client certificate asked for.
    pub api_server: Arc<ServerConfig>,
}

impl Material {
    fn build(ca_pem: &str, cert_pem: &str, key_pem: &str, members: &Arc<Members>) -> Result<Self, PkiError> {
        let ca = cert_from_pem(ca_pem, "the cluster CA certificate")?;
        let cert = cert_from_pem(cert_pem, "this node's certificate")?;
        let key = || PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| invalid("this node's key", e));
        let chain = vec![cert.clone(), ca.clone()];
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca)?, provider())
            .build()
            .map_err(|e| invalid("the cluster CA certificate", e))?;
        let server_builder = || {
            ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("ring supports TLS 1.3")
        };
        let mut node_server = server_builder()
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key()?)
            .map_err(|e| invalid("this node's certificate and key", e))?;
        node_server.alpn_protocols = vec![ALPN_BLOCKS.to_vec(), ALPN_HTTP.to_vec()];
        node_server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        node_server.send_tls13_tickets = 0;
        let mut api_server = server_builder()
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key()?)
            .map_err(|e| invalid("this node's certificate and key", e))?;
        api_server.alpn_protocols = vec![ALPN_HTTP.to_vec()];
        let verifier = server_verifier(&ca, None, Some(members.clone()))?;
        let client = |alpn: &[u8]| -> Result<ClientConfig, PkiError> {
            let mut config = client_builder()
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_auth_cert(chain.clone(), key()?)
                .map_err(|e| invalid("this node's certificate and key", e))?;
            config.alpn_protocols = vec![alpn.to_vec()];
            // Every connection is a full handshake: a resumed one would skip the member check.
            config.resumption = rustls::client::Resumption::disabled();
            Ok(config)
        };
        Ok(Material {
            ca_pem: ca_pem.to_string(),
            ca_sha256: fingerprint(&ca),
            cert_sha256: fingerprint(&cert),
            node_server: Arc::new(node_server),
            blocks_client: Arc::new(client(ALPN_BLOCKS)?),
            http_client: client(ALPN_HTTP)?,
            api_server: Arc::new(api_server),
        })
    }
}

/// This node's key and, once it is in a cluster, its certificate: kept in a directory of
/// its own, readable by the daemon's user only.
#[derive(Debug)]
pub struct NodeTls {
    dir: PathBuf,
    key_pem: String,
    public_key: Vec<u8>,
    material: RwLock<Option<Arc<Material>>>,
    members: Arc<Members>,
}

const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.pem";
const CA_FILE: &str = "ca.pem";
/// The members' certificate fingerprints while this node joins, one per line.
const JOINING_FILE: &str = "joining";

impl NodeTls {
    /// Opens (or makes) the node's key in `dir`, and its certificate if it has one.
    pub fn open(dir: &Path) -> Result<Self, PkiError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| PkiError::Io { path, source }
        };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let key_path = dir.join(KEY_FILE);
        let key_pem = match std::fs::read_to_string(&key_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pem = KeyPair::generate_for(KEY_ALGORITHM).map_err(generate)?.serialize_pem();
                let partial = dir.join(format!("{KEY_FILE}.partial"));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&partial)
                    .map_err(io(&partial))?;
                std::io::Write::write_all(&mut file, pem.as_bytes()).map_err(io(&partial))?;
                file.sync_all().map_err(io(&partial))?;
                std::fs::rename(&partial, &key_path).map_err(io(&key_path))?;
                pem
            }
            Err(e) => return Err(io(&key_path)(e)),
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(&key_path.display().to_string(), e))?;
        let tls = NodeTls {
            dir: dir.to_path_buf(),
            public_key: key.public_key_raw().to_vec(),
            key_pem,
            material: RwLock::new(None),
            members: Arc::default(),
        };
        let (ca, cert) = (dir.join(CA_FILE), dir.join(CERT_FILE));
        if ca.exists() && cert.exists() {
            let ca_pem = std::fs::read_to_string(&ca).map_err(io(&ca))?;
            let cert_pem = std::fs::read_to_string(&cert).map_err(io(&cert))?;
            *tls.material.write().expect("tls lock") =
                Some(Arc::new(Material::build(&ca_pem, &cert_pem, &tls.key_pem, &tls.members)?));
        }
        Ok(tls)
    }

    /// Makes calls to other nodes trust a server only if `check` says its certificate (by
    /// fingerprint) is a node's of the cluster.
    pub fn check_members_with(&self, check: impl Fn(&str) -> bool + Send + Sync + 'static) {
        *self.members.0.write().expect("members lock") = Some(Box::new(check));
    }

    /// Remembers, across a restart, the members a join in progress lets in until `until`
    /// (`None`: no join in progress).
    pub fn set_joining(&self, members: Option<(&[String], std::time::SystemTime)>) -> Result<(), PkiError> {
        let path = self.dir.join(JOINING_FILE);
        let io = |source| PkiError::Io { path: path.display().to_string(), source };
        match members {
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
                _ => Ok(()),
            },
            Some((members, until)) => {
                let until = until.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                std::fs::write(&path, format!("{until}\n{}", members.join("\n"))).map_err(io)
            }
        }
    }

    /// The members a join in progress lets in, if one was under way and is not past its time.
    pub fn joining(&self) -> Option<Vec<String>> {
        let text = std::fs::read_to_string(self.dir.join(JOINING_FILE)).ok()?;
        let mut lines = text.lines();
        let until: u64 = lines.next()?.parse().ok()?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        (now <= until).then(|| lines.map(str::to_string).collect())
    }

    /// This node's public key, for a CA to sign.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// What the node serves and connects with, once it has a certificate.
    pub fn material(&self) -> Option<Arc<Material>> {
        self.material.read().expect("tls lock").clone()
    }

    /// Takes the certificate a CA signed for this node's key, and keeps it.
    pub fn install(&self, ca_pem: &str, cert_pem: &str) -> Result<Arc<Material>, PkiError> {
        let material = Arc::new(Material::build(ca_pem, cert_pem, &self.key_pem, &self.members)?);
        // The certificate first, the CA last: `open` takes the pair only once both are there.
        let _ = std::fs::remove_file(self.dir.join(CA_FILE));
        for (file, pem) in [(CERT_FILE, cert_pem), (CA_FILE, ca_pem)] {
            let path = self.dir.join(file);
            let partial = self.dir.join(format!("{file}.partial"));
            let written = std::fs::File::create(&partial)
                .and_then(|mut f| std::io::Write::write_all(&mut f, pem.as_bytes()).and_then(|()| f.sync_all()))
                .and_then(|()| std::fs::rename(&partial, &path))
                .and_then(|()| std::fs::File::open(&self.dir)?.sync_all());
            written.map_err(|source| PkiError::Io { path: path.display().to_string(), source })?;
        }
        *self.material.write().expect("tls lock") = Some(material.clone());
        Ok(material)
    }
}

#[cfg(test)]
mod tests;
