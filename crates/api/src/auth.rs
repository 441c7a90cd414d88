//! Who may call what (docs/threat-model.md). Over the network every call but the health
//! check needs a token whose role allows it; `cluster init` and `cluster join` are taken
//! only on the node's local socket (root). The local socket needs no token.

use crate::services::NodeServices;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use model::{Role, TokenKind};

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone: the health check.
    Public,
    /// A token with at least this role.
    Role(Role),
    /// Only on the node itself, through its local socket.
    LocalOnly,
}

/// What a call to `path` with `method` needs. Anything not listed needs an admin.
pub fn required(method: &Method, path: &str) -> Access {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let read = *method == Method::GET || *method == Method::HEAD;
    match segments.as_slice() {
        // A joining node's request: its join token is checked by the member answering. The
        // CA certificate is what clients trust nodes by: public.
        ["v1", "health"] | ["internal", "join"] | ["v1", "cluster", "ca"] => Access::Public,
        ["v1", "cluster", "init" | "join"] => Access::LocalOnly,
        ["v1", "tokens", ..] | ["v1", "disks", ..] => Access::Role(Role::Admin),
        ["v1", "nodes", _, "check"] if read => Access::Role(Role::Viewer),
        ["v1", "nodes", ..] => Access::Role(Role::Admin),
        // A volume's bytes and a guest's console are its data, not metadata.
        // Reading a console is as good as typing into it (a password prompt, a shell).
        ["v1", "volumes", _, "data" | "blocks", ..] | ["v1", "vms", _, "console", ..] => Access::Role(Role::Operator),
        ["v1", "cluster" | "volumes" | "vms" | "networks" | "events", ..] if read => Access::Role(Role::Viewer),
        ["v1", "volumes" | "vms", ..] => Access::Role(Role::Operator),
        _ => Access::Role(Role::Admin),
    }
}

/// The network side's gate: a call goes on only with what `required` asks for.
pub async fn network_gate(State(node): State<NodeServices>, request: Request, next: Next) -> Response {
    // Paths are matched as sent: one with a step in it is nobody's.
    if request.uri().path().split('/').skip(1).any(|s| s.is_empty() || s == "." || s == "..") {
        return refuse(StatusCode::BAD_REQUEST, "a path with an empty, '.' or '..' step");
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // The caller's role, if the token is one that works.
    let role_now = || {
        let state = node.cluster().state();
        presented.and_then(|p| cluster::tokens::verify(&state, p)).and_then(|t| match t.kind {
            TokenKind::Api { role } => Some(role),
            TokenKind::Join { .. } => None,
        })
    };
    let needed = required(request.method(), request.uri().path());
    let mut role = role_now();
    let unseen = presented.is_some_and(|p| cluster::tokens::unseen(&node.cluster().state(), p));
    if role.is_none() && unseen && matches!(needed, Access::Role(_)) {
        // A token just made through another node may not have reached this one yet.
        if let Err(e) = node.cluster().catch_up().await {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("this node does not know the token and cannot check with the cluster now ({e}): try again"),
            );
        }
        role = role_now();
    }
    let unknown = || match presented {
        None => refuse(
            StatusCode::UNAUTHORIZED,
            "a token is needed: pass --token or set CONVERGE_TOKEN (`converge token create` makes one)",
        ),
        Some(_) => refuse(StatusCode::UNAUTHORIZED, "the token was not accepted: it is unknown, revoked or mistyped"),
    };
    match (needed, role) {
        (Access::Public, _) => next.run(request).await,
        (Access::LocalOnly, Some(_)) => refuse(
            StatusCode::FORBIDDEN,
            "this is done on the node itself: run the command there as root (it uses the node's local socket)",
        ),
        (Access::LocalOnly, None) => refuse(
            StatusCode::UNAUTHORIZED,
            "this is done on the node itself: run the command there as root (it uses the node's local socket)",
        ),
        (Access::Role(needed), Some(role)) if role >= needed => next.run(request).await,
        (Access::Role(needed), Some(role)) => {
            refuse(StatusCode::FORBIDDEN, &format!("this needs the {needed} role; the token given is a {role}'s"))
        }
        (Access::Role(_), None) => unknown(),
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(crate::v1::ErrorBody { error: message.to_string() })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_needs_a_viewer_running_an_operator_and_changing_the_cluster_an_admin() {
        let get = Method::GET;
        let post = Method::POST;
        let delete = Method::DELETE;
        assert_eq!(required(&get, "/v1/health"), Access::Public);
        assert_eq!(required(&get, "/v1/cluster"), Access::Role(Role::Viewer));
        assert_eq!(required(&get, "/v1/vms/web"), Access::Role(Role::Viewer));
        assert_eq!(required(&get, "/v1/events"), Access::Role(Role::Viewer));
        assert_eq!(required(&get, "/v1/nodes/node-1/check"), Access::Role(Role::Viewer));
        assert_eq!(required(&post, "/v1/vms/web/start"), Access::Role(Role::Operator));
        assert_eq!(required(&delete, "/v1/volumes/v"), Access::Role(Role::Operator));
        assert_eq!(required(&get, "/v1/volumes/v/data"), Access::Role(Role::Operator));
        assert_eq!(required(&get, "/v1/volumes/v/blocks/0"), Access::Role(Role::Operator));
        assert_eq!(required(&get, "/v1/vms/web/console"), Access::Role(Role::Operator));
        assert_eq!(required(&get, "/v1/vms/web/console/session"), Access::Role(Role::Operator));
        assert_eq!(required(&post, "/v1/disks"), Access::Role(Role::Admin));
        assert_eq!(required(&get, "/v1/networks"), Access::Role(Role::Viewer));
        assert_eq!(required(&post, "/v1/networks"), Access::Role(Role::Admin));
        assert_eq!(required(&delete, "/v1/networks/lan"), Access::Role(Role::Admin));
        assert_eq!(required(&post, "/v1/nodes/node-1/drain"), Access::Role(Role::Admin));
        assert_eq!(required(&delete, "/v1/nodes/node-1"), Access::Role(Role::Admin));
        assert_eq!(required(&get, "/v1/tokens"), Access::Role(Role::Admin));
        assert_eq!(required(&post, "/v1/cluster/init"), Access::LocalOnly);
        assert_eq!(required(&post, "/v1/cluster/join"), Access::LocalOnly);
        assert_eq!(required(&get, "/v1/anything-new"), Access::Role(Role::Admin), "unknown paths need the most");
        assert_eq!(required(&post, "/internal/join"), Access::Public);
        assert_eq!(required(&get, "/v1/cluster/ca"), Access::Public);
        assert_eq!(required(&post, "/internal/peer"), Access::Role(Role::Admin), "peer calls go to the node port");
    }
}
