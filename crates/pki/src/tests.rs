use super::*;
use rustls::{ClientConnection, ServerConnection};

/// A node of a cluster whose CA is `ca`, with its key in a directory of its own.
fn node(ca: &NewCa, id: u64) -> (tempfile::TempDir, NodeTls) {
    let dir = tempfile::tempdir().unwrap();
    let tls = NodeTls::open(&dir.path().join("tls")).unwrap();
    let cert = sign_node(&ca.key_pem, id, &["127.0.0.2".parse().unwrap()], tls.public_key()).unwrap();
    tls.install(&ca.cert_pem, &cert).unwrap();
    (dir, tls)
}

/// Runs a handshake in memory; the server's view of the client's certificate if it succeeds.
fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Result<Option<String>, rustls::Error> {
    let name = ServerName::try_from("10.9.8.7").unwrap();
    let mut client = ClientConnection::new(client, name)?;
    let mut server = ServerConnection::new(server)?;
    for _ in 0..10 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut read = &wire[..];
        while !read.is_empty() {
            server.read_tls(&mut read).unwrap();
        }
        server.process_new_packets()?;
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        let mut read = &wire[..];
        while !read.is_empty() {
            client.read_tls(&mut read).unwrap();
        }
        client.process_new_packets()?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(server.peer_certificates().and_then(|c| c.first()).map(|c| fingerprint(c)));
        }
    }
    Err(rustls::Error::General("the handshake did not finish".into()))
}

#[test]
fn nodes_of_one_cluster_know_each_other_by_certificate() {
    let ca = new_ca().unwrap();
    let (_a_dir, a) = node(&ca, 1);
    let (_b_dir, b) = node(&ca, 2);
    let (a, b) = (a.material().unwrap(), b.material().unwrap());
    let seen = handshake(a.blocks_client.clone(), b.node_server.clone()).unwrap();
    assert_eq!(seen.as_deref(), Some(a.cert_sha256.as_str()), "the server sees which node called");
    assert_ne!(a.cert_sha256, b.cert_sha256);
    assert_eq!(a.ca_sha256, fingerprint_pem(&ca.cert_pem).unwrap());
}

#[test]
fn a_node_calls_only_servers_whose_certificate_is_a_members() {
    let ca = new_ca().unwrap();
    let (_a_dir, a) = node(&ca, 1);
    let (_b_dir, b) = node(&ca, 2);
    let member = b.material().unwrap().cert_sha256.clone();
    let server = b.material().unwrap().node_server.clone();
    a.check_members_with(move |fpr| fpr == member);
    assert!(handshake(a.material().unwrap().blocks_client.clone(), server.clone()).is_ok());
    a.check_members_with(|_| false);
    assert!(handshake(a.material().unwrap().blocks_client.clone(), server).is_err(), "B was removed");
}

#[test]
fn the_node_port_takes_no_client_without_a_certificate_of_the_cluster() {
    let ca = new_ca().unwrap();
    let (_dir, server) = node(&ca, 1);
    let server = server.material().unwrap().node_server.clone();

    let anonymous = api_client(&ca.cert_pem).unwrap();
    assert!(handshake(Arc::new(anonymous), server.clone()).is_err(), "a client without a certificate");

    let other = new_ca().unwrap();
    let (_other_dir, stranger) = node(&other, 1);
    let stranger = stranger.material().unwrap().blocks_client.clone();
    assert!(handshake(stranger, server).is_err(), "a node of another cluster");
}

#[test]
fn a_client_trusts_only_servers_of_its_cluster() {
    let ca = new_ca().unwrap();
    let (_dir, server) = node(&ca, 1);
    let server = server.material().unwrap().api_server.clone();
    assert!(handshake(Arc::new(api_client(&ca.cert_pem).unwrap()), server.clone()).is_ok());

    let other = new_ca().unwrap();
    assert!(handshake(Arc::new(api_client(&other.cert_pem).unwrap()), server).is_err());
}

#[test]
fn a_joining_node_checks_the_ca_named_by_its_token() {
    let ca = new_ca().unwrap();
    let (_dir, server) = node(&ca, 1);
    let server = server.material().unwrap().api_server.clone();
    let right = fingerprint_pem(&ca.cert_pem).unwrap();
    assert!(handshake(Arc::new(joining_client(&right).unwrap()), server.clone()).is_ok());

    let wrong = fingerprint_pem(&new_ca().unwrap().cert_pem).unwrap();
    assert!(handshake(Arc::new(joining_client(&wrong).unwrap()), server.clone()).is_err());

    // A server of another CA that sends the right CA along in its chain proves nothing.
    let other = new_ca().unwrap();
    let (_other_dir, impostor) = node(&other, 1);
    let impostor_cert = std::fs::read_to_string(_other_dir.path().join("tls").join(CERT_FILE)).unwrap();
    let key = std::fs::read_to_string(_other_dir.path().join("tls").join(KEY_FILE)).unwrap();
    let chain = vec![cert_from_pem(&impostor_cert, "").unwrap(), cert_from_pem(&ca.cert_pem, "").unwrap()];
    let forged = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap())
        .unwrap();
    drop(impostor);
    assert!(handshake(Arc::new(joining_client(&right).unwrap()), Arc::new(forged)).is_err());
}

#[test]
fn a_node_keeps_its_key_and_certificate_across_restarts() {
    let ca = new_ca().unwrap();
    let (dir, tls) = node(&ca, 7);
    let before = tls.material().unwrap().cert_sha256.clone();
    let key = tls.public_key().to_vec();
    drop(tls);
    let again = NodeTls::open(&dir.path().join("tls")).unwrap();
    assert_eq!(again.public_key(), key);
    assert_eq!(again.material().unwrap().cert_sha256, before);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("tls").join(KEY_FILE)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_malformed_public_key_gets_no_certificate() {
    let ca = new_ca().unwrap();
    assert!(sign_node(&ca.key_pem, 1, &[], &[4; 10]).is_err());
    assert!(sign_node(&ca.key_pem, 1, &[], &[3; PUBLIC_KEY_BYTES]).is_err());
}

#[test]
fn a_join_in_progress_is_remembered_until_it_is_over() {
    let ca = new_ca().unwrap();
    let (dir, tls) = node(&ca, 3);
    assert_eq!(tls.joining(), None);
    let members = ["a".repeat(64), "b".repeat(64)];
    let soon = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
    tls.set_joining(Some((&members, soon))).unwrap();
    let again = NodeTls::open(&dir.path().join("tls")).unwrap();
    assert_eq!(again.joining(), Some(members.to_vec()), "across a restart");
    again.set_joining(None).unwrap();
    assert_eq!(NodeTls::open(&dir.path().join("tls")).unwrap().joining(), None);
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    tls.set_joining(Some((&members, past))).unwrap();
    assert_eq!(tls.joining(), None, "a join past its time lets no one in");
}
