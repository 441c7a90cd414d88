//! Who gets in (docs/threat-model.md): over the network nothing but the health check works
//! without a token, and nothing at all in the clear; each role does what it may and no
//! more; a stranger can neither initialise a node nor make it join a cluster; the node port
//! completes no handshake with a client that has no certificate of the cluster, and serves
//! nothing to one whose certificate is no member's; join tokens expire and can be revoked.

mod common;

use common::{json, run_as, NodeProcess};
use std::time::Duration;

fn over_network(node: &NodeProcess, token: Option<&str>) -> Vec<String> {
    let mut target = vec![
        "--server".to_string(),
        format!("https://{}", node.addr),
        "--ca".to_string(),
        node.ca().display().to_string(),
    ];
    if let Some(token) = token {
        target.extend(["--token".to_string(), token.to_string()]);
    }
    target
}

/// Every route of the API, as a caller without credentials would try it.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/cluster"),
    ("POST", "/v1/cluster/init"),
    ("POST", "/v1/cluster/join"),
    ("POST", "/v1/disks"),
    ("GET", "/v1/volumes"),
    ("POST", "/v1/volumes"),
    ("GET", "/v1/volumes/v"),
    ("DELETE", "/v1/volumes/v"),
    ("GET", "/v1/volumes/v/data"),
    ("PUT", "/v1/volumes/v/data"),
    ("GET", "/v1/volumes/v/blocks/0"),
    ("PUT", "/v1/volumes/v/blocks/0"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/web"),
    ("DELETE", "/v1/vms/web"),
    ("POST", "/v1/vms/web/start"),
    ("POST", "/v1/vms/web/stop"),
    ("GET", "/v1/vms/web/console"),
    ("GET", "/v1/events"),
    ("POST", "/v1/nodes/node-1/drain"),
    ("POST", "/v1/nodes/node-1/resume"),
    ("GET", "/v1/nodes/node-1/check"),
    ("DELETE", "/v1/nodes/node-1"),
    ("GET", "/v1/tokens"),
    ("POST", "/v1/tokens"),
    ("DELETE", "/v1/tokens/0123456789abcdef"),
    // Cluster traffic belongs on the node port.
    ("POST", "/internal/peer"),
    ("POST", "/internal/snapshot"),
    ("GET", "/internal/vms/web/console"),
];

#[test]
fn without_a_token_only_the_health_check_answers_and_each_role_does_what_it_may() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let node = NodeProcess::start(dir.path(), 12, 18750);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let plain = reqwest::Client::new();
    // A stranger cannot make an uninitialised node a cluster of theirs: init and join are
    // not on the network at all (and a node in no cluster has no certificate to serve TLS).
    for path in ["/v1/cluster/init", "/v1/cluster/join"] {
        let status = runtime.block_on(plain.post(format!("http://{}{path}", node.addr)).send()).unwrap().status();
        assert_eq!(status, 401, "{path} in the clear");
    }
    assert!(json(&node.cli(&["--json", "cluster", "status"]))["cluster_id"].is_null(), "still no cluster");

    let init = json(&node.cli(&["--json", "cluster", "init"]));
    let admin = init["admin_token"].as_str().unwrap().to_string();
    let again = node.cli_result(&["cluster", "init"]).unwrap_err();
    assert!(again.contains("already a member"), "an initialised node is not initialised again: {again}");
    node.cli(&["disk", "add", node.data_dir.with_extension("disk").to_str().unwrap(), "--size", "256M"]);
    node.cli(&["volume", "create", "v", "--size", "4M", "--replicas", "1"]);

    // Nothing but the health check, without credentials or with a wrong token; nothing but
    // the health check in the clear, whatever the token.
    let https = {
        let tls = pki::api_client(&std::fs::read_to_string(node.ca()).unwrap()).unwrap();
        reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap()
    };
    let statuses = |http: &reqwest::Client, scheme: &str, token: Option<&str>| {
        runtime.block_on(async {
            let mut statuses = Vec::new();
            for (method, path) in ROUTES {
                let mut request = http.request(method.parse().unwrap(), format!("{scheme}://{}{path}", node.addr));
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                statuses.push((*method, *path, request.send().await.unwrap().status().as_u16()));
            }
            let health = http.get(format!("{scheme}://{}/v1/health", node.addr)).send().await.unwrap();
            (statuses, health.status().as_u16())
        })
    };
    let forged = format!("cvt1_{}_{}", &admin[5..21], "0".repeat(32));
    for (http, scheme, token, what) in [
        (&https, "https", None, "without a token"),
        (&https, "https", Some(forged.as_str()), "with a forged token"),
        (&plain, "http", None, "in the clear"),
        (&plain, "http", Some(admin.as_str()), "in the clear, even with the admin token"),
    ] {
        let (answered, health) = statuses(http, scheme, token);
        assert_eq!(health, 200, "the health check {what}");
        for (method, path, status) in answered {
            assert_eq!(status, 401, "{method} {path} {what}");
        }
    }
    let anonymous_cli = run_as(&over_network(&node, None), &["volume", "list"]).unwrap_err();
    assert!(anonymous_cli.contains("a token is needed"), "{anonymous_cli}");

    // Each role does what it may, and no more.
    let viewer = node.token("viewer");
    let operator = node.token("operator");
    let as_viewer = over_network(&node, Some(&viewer));
    let as_operator = over_network(&node, Some(&operator));
    let as_admin = over_network(&node, Some(&admin));
    run_as(&as_viewer, &["volume", "list"]).unwrap();
    let viewer_write = run_as(&as_viewer, &["volume", "create", "w", "--size", "4M", "--replicas", "1"]).unwrap_err();
    assert!(viewer_write.contains("needs the operator role"), "{viewer_write}");
    run_as(&as_operator, &["volume", "create", "w", "--size", "4M", "--replicas", "1"]).unwrap();
    let operator_disk = run_as(&as_operator, &["disk", "add", "/nowhere", "--size", "64M"]).unwrap_err();
    assert!(operator_disk.contains("needs the admin role"), "{operator_disk}");
    let operator_token = run_as(&as_operator, &["token", "create", "--role", "admin"]).unwrap_err();
    assert!(operator_token.contains("needs the admin role"), "no one makes a token above their role: {operator_token}");
    let with_token_init = run_as(&as_admin, &["cluster", "init"]).unwrap_err();
    assert!(with_token_init.contains("done on the node itself"), "{with_token_init}");

    // A revoked token works no more; the list never shows secrets.
    let listed = run_as(&as_admin, &["--json", "token", "list"]).unwrap();
    let id = &viewer[5..21];
    assert!(listed.contains(id) && !listed.contains(&viewer[22..]), "{listed}");
    run_as(&as_admin, &["token", "revoke", id]).unwrap();
    let revoked = run_as(&as_viewer, &["volume", "list"]).unwrap_err();
    assert!(revoked.contains("not accepted"), "{revoked}");

    // The node's local socket and data dir are root's alone.
    use std::os::unix::fs::PermissionsExt;
    let socket_mode = std::fs::metadata(node.data_dir.join("api.sock")).unwrap().permissions().mode();
    assert_eq!(socket_mode & 0o777, 0o600);
}

#[test]
fn a_join_token_that_expired_or_was_revoked_lets_no_node_in() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let first = NodeProcess::start(dir.path(), 13, 18755);
    let second = NodeProcess::start(dir.path(), 14, 18755);
    first.cli(&["cluster", "init"]);
    let token = |ttl: &str| {
        let created = json(&first.cli(&["--json", "token", "create", "--join", "--ttl", ttl]));
        (created["id"].as_str().unwrap().to_string(), created["token"].as_str().unwrap().to_string())
    };
    let join = |token: &str| second.cli_result(&["cluster", "join", "--peer", &first.addr, "--join-token", token]);

    let (_, short) = token("1s");
    std::thread::sleep(Duration::from_secs(2));
    let expired = join(&short).unwrap_err();
    let (revoked_id, revoked) = token("1h");
    first.cli(&["token", "revoke", &revoked_id]);
    let after_revoke = join(&revoked).unwrap_err();
    let (_, good) = token("1h");
    join(&good).unwrap();

    assert!(expired.contains("join token was not accepted"), "{expired}");
    assert!(after_revoke.contains("join token was not accepted"), "{after_revoke}");
    let status = json(&first.cli(&["--json", "cluster", "status"]));
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2, "{status}");
}

/// Makes a 4 KiB volume through `node`'s API.
async fn create_volume(https: &reqwest::Client, node: &NodeProcess, admin: &str, name: &str) {
    let made = https
        .post(format!("https://{}/v1/volumes", node.addr))
        .bearer_auth(admin)
        .json(&serde_json::json!({"name": name, "size_bytes": 4096, "replicas": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 201, "{:?}", made.text().await);
}

/// A token made through one node works at once on every other: a follower that has not
/// seen it yet catches up with the leader before it says no. Join tokens too, and a volume
/// named in a path.
#[test]
fn a_token_or_a_volume_made_through_one_node_is_there_at_once_on_every_other() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (nodes, _) = common::cluster_and_token(dir.path(), [16, 17, 18], 18770);
    let admin = nodes[0].token("admin");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tls = pki::api_client(&std::fs::read_to_string(nodes[0].ca()).unwrap()).unwrap();
    let https = reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap();
    // Made and used over HTTP, in one process: nothing between the two to hide the lag.
    // Every pair of nodes, each way, several times over.
    runtime.block_on(async {
        for round in 0..8 {
            for (maker, user) in [(0, 1), (1, 2), (2, 0), (1, 0), (2, 1), (0, 2)] {
                let made = https
                    .post(format!("https://{}/v1/tokens", nodes[maker].addr))
                    .bearer_auth(&admin)
                    .json(&serde_json::json!({"role": "viewer", "name": format!("r{round}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(made.status(), 201, "{:?}", made.text().await);
                let token = made.json::<serde_json::Value>().await.unwrap()["token"].as_str().unwrap().to_string();
                let used =
                    https.get(format!("https://{}/v1/vms", nodes[user].addr)).bearer_auth(&token).send().await.unwrap();
                let status = used.status();
                assert_eq!(status, 200, "round {round}: made on {maker}, used on {user}: {:?}", used.text().await);

                let name = format!("v{round}-{maker}{user}");
                create_volume(&https, &nodes[maker], &admin, &name).await;
                let shown = https
                    .get(format!("https://{}/v1/volumes/{name}", nodes[user].addr))
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .unwrap();
                let status = shown.status();
                assert_eq!(status, 200, "{name} made on {maker}, shown on {user}: {:?}", shown.text().await);
            }
        }
        let missing =
            https.get(format!("https://{}/v1/volumes/none", nodes[1].addr)).bearer_auth(&admin).send().await.unwrap();
        assert_eq!(missing.status(), 404, "a name nobody made is still unknown");

        // A name in a body: a VM booting a kernel kept in a volume just made elsewhere.
        for (maker, user) in [(0, 1), (1, 2), (2, 0), (1, 0), (2, 1), (0, 2)] {
            let kernel = format!("k-{maker}{user}");
            create_volume(&https, &nodes[maker], &admin, &kernel).await;
            let vm = serde_json::json!({
                "name": format!("vm-{maker}{user}"), "cpus": 1, "memory_bytes": 256 << 20, "disks": [],
                "boot": {"from": "kernel", "kernel": {"volume": kernel, "len_bytes": 512}, "initrd": null, "cmdline": ""},
            });
            let created =
                https.post(format!("https://{}/v1/vms", nodes[user].addr)).bearer_auth(&admin).json(&vm).send().await;
            let created = created.unwrap();
            let status = created.status();
            assert_eq!(status, 201, "{kernel} made on {maker}, booted on {user}: {:?}", created.text().await);
        }
    });

    // A join token made on one member lets a node in through another at once.
    let newcomer = NodeProcess::start(dir.path(), 19, 18770);
    let join = json(&nodes[1].cli(&["--json", "token", "create", "--join"]));
    let join = join["token"].as_str().unwrap();
    newcomer.cli(&["cluster", "join", "--peer", &nodes[2].addr, "--join-token", join]);
    // The newcomer has seen itself join; the others may be a heartbeat behind.
    let status = json(&newcomer.cli(&["--json", "cluster", "status"]));
    assert_eq!(status["nodes"].as_array().unwrap().len(), 4, "{status}");
}

/// What the node port at `addr` answers to a ping from a client with `tls`: its HTTP status,
/// or why there was none.
fn ping_node_port(runtime: &tokio::runtime::Runtime, tls: rustls::ClientConfig, addr: &str) -> Result<u16, String> {
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .unwrap();
    let sent =
        runtime.block_on(async { http.post(format!("https://{addr}/internal/peer")).json(&"Ping").send().await });
    sent.map(|r| r.status().as_u16()).map_err(|e| format!("{e:?}"))
}

#[test]
fn the_node_port_serves_nodes_of_the_cluster_and_no_one_else() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let node = NodeProcess::start(dir.path(), 15, 18760);
    let init = json(&node.cli(&["--json", "cluster", "init"]));
    let join_token = init["join_token"].as_str().unwrap();
    let node_port = "127.0.0.15:18761";
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ca_pem = std::fs::read_to_string(node.ca()).unwrap();

    // The node itself, with its certificate: answered.
    let member = pki::NodeTls::open(&node.data_dir.join("tls")).unwrap().material().unwrap();
    assert_eq!(ping_node_port(&runtime, member.http_client.clone(), node_port), Ok(200));

    // Callers from twelve addresses, and from the member's own (127.0.0.1), open eight
    // connections each and never say a word: more stalled handshakes than the pool holds.
    // A node still gets in, at once.
    let stalled: Vec<_> = runtime.block_on(async {
        let mut stalled = Vec::new();
        for host in 0..13u8 {
            for _ in 0..8 {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                let from = if host == 12 { [127, 0, 0, 1] } else { [127, 0, 1, host + 1] };
                socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
                stalled.push(socket.connect(node_port.parse().unwrap()).await.unwrap());
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stalled
    });
    let began = std::time::Instant::now();
    assert_eq!(ping_node_port(&runtime, member.http_client.clone(), node_port), Ok(200));
    assert!(began.elapsed() < std::time::Duration::from_secs(2), "{:?}", began.elapsed());
    drop(stalled);

    // No certificate: the handshake is refused.
    let anonymous = ping_node_port(&runtime, pki::api_client(&ca_pem).unwrap(), node_port);
    assert!(anonymous.is_err(), "{anonymous:?}");

    // A certificate of another cluster's CA.
    let other = pki::new_ca().unwrap();
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = pki::NodeTls::open(stranger_dir.path()).unwrap();
    let cert = pki::sign_node(&other.key_pem, 99, &[], stranger.public_key()).unwrap();
    let stranger = stranger.install(&other.cert_pem, &cert).unwrap();
    let foreign = ping_node_port(&runtime, stranger.http_client.clone(), node_port);
    assert!(foreign.is_err(), "{foreign:?}");

    // A certificate of this cluster's CA, got with a join token by a node that never joined:
    // the state records no such node, so the node port serves it nothing.
    let half_dir = tempfile::tempdir().unwrap();
    let half = pki::NodeTls::open(half_dir.path()).unwrap();
    let certify = serde_json::json!({"Certify": {
        "token": join_token,
        "node": {"id": 4242, "api_addr": "127.0.0.16:18760", "data_addr": "127.0.0.16:18761", "cert_sha256": ""},
        "public_key": half.public_key(),
    }});
    let ca_sha256 = pki::fingerprint_pem(&ca_pem).unwrap();
    let joining =
        reqwest::Client::builder().use_preconfigured_tls(pki::joining_client(&ca_sha256).unwrap()).build().unwrap();
    let reply: serde_json::Value = runtime.block_on(async {
        let sent = joining.post(node.url("/internal/join")).json(&certify).send().await.unwrap();
        sent.json().await.unwrap()
    });
    let certified = &reply["Certify"]["Ok"];
    let ca = certified["ca_pem"].as_str().unwrap();
    let half = half.install(ca, certified["cert_pem"].as_str().unwrap()).unwrap();
    let not_a_member = ping_node_port(&runtime, half.http_client.clone(), node_port);
    assert!(not_a_member.is_err(), "{not_a_member:?}");
    assert!(node.log_text().contains("its certificate is no node's of this cluster"), "{}", node.log_text());

    // Nor does a client in the clear get a word.
    use std::io::{Read, Write};
    let mut plain = std::net::TcpStream::connect(node_port).unwrap();
    plain.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    plain.write_all(b"POST /internal/peer HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\n\"Ping\"").unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"), "{answer:?}");
}
