//! Who gets in (docs/threat-model.md): over the network nothing but the health check works
//! without a token, each role does what it may and no more, a stranger can neither
//! initialise a node nor make it join a cluster, and join tokens expire and can be revoked.

mod common;

use common::{json, run_as, NodeProcess};
use std::time::Duration;

fn over_network(node: &NodeProcess, token: Option<&str>) -> Vec<String> {
    let mut target = vec!["--server".to_string(), format!("http://{}", node.addr)];
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
    // Cluster traffic, from an address that is no node's.
    ("POST", "/internal/peer"),
    ("POST", "/internal/snapshot"),
    ("GET", "/internal/vms/web/console"),
];

#[test]
fn without_a_token_only_the_health_check_answers_and_each_role_does_what_it_may() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let node = NodeProcess::start(dir.path(), 12, 18750);

    // A stranger cannot make an uninitialised node a cluster of theirs.
    let stranger_init = run_as(&over_network(&node, None), &["cluster", "init"]).unwrap_err();
    let stranger_join =
        run_as(&over_network(&node, None), &["cluster", "join", "--peer", "127.0.0.1:1", "--join-token", "x"])
            .unwrap_err();
    assert!(stranger_init.contains("done on the node itself"), "{stranger_init}");
    assert!(stranger_join.contains("done on the node itself"), "{stranger_join}");
    assert!(json(&node.cli(&["--json", "cluster", "status"]))["cluster_id"].is_null(), "still no cluster");

    let init = json(&node.cli(&["--json", "cluster", "init"]));
    let admin = init["admin_token"].as_str().unwrap().to_string();
    node.cli(&["disk", "add", node.data_dir.with_extension("disk").to_str().unwrap(), "--size", "256M"]);
    node.cli(&["volume", "create", "v", "--size", "4M", "--replicas", "1"]);

    // Nothing but the health check, without credentials or with a wrong token.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let statuses = |token: Option<&str>| {
        runtime.block_on(async {
            let http = reqwest::Client::new();
            let mut statuses = Vec::new();
            for (method, path) in ROUTES {
                let mut request = http.request(method.parse().unwrap(), format!("http://{}{path}", node.addr));
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                statuses.push((*method, *path, request.send().await.unwrap().status().as_u16()));
            }
            let health = http.get(format!("http://{}/v1/health", node.addr)).send().await.unwrap();
            (statuses, health.status().as_u16())
        })
    };
    let (anonymous, health) = statuses(None);
    assert_eq!(health, 200);
    for (method, path, status) in &anonymous {
        assert_eq!(*status, 401, "{method} {path} without a token");
    }
    let forged = format!("cvt1_{}_{}", &admin[5..21], "0".repeat(32));
    for (method, path, status) in statuses(Some(&forged)).0 {
        assert_eq!(status, 401, "{method} {path} with a forged token");
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
