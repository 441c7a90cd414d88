//! Who may do what: API tokens with a role, and join tokens for new nodes. The state keeps
//! a token's id and the SHA-256 of its secret, never the secret itself; checking a
//! presented token (hashing, constant-time comparison, expiry against a clock) is the API's
//! and the leader's, not `apply`'s.

use crate::command::CommandError;
use crate::state::ClusterState;
use serde::{Deserialize, Serialize};

/// What an API token may do. Each role may do everything the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the cluster, nodes, volumes, VMs and events.
    Viewer,
    /// Also creates, starts, stops and deletes VMs and volumes, and reads and writes their data.
    Operator,
    /// Also adds disks, drains and removes nodes, and makes and revokes tokens.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("{other:?} is not a role: viewer, operator or admin")),
        }
    }
}

/// What a token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TokenKind {
    /// Calls the API with `role`.
    Api { role: Role },
    /// Lets a node join the cluster until `expires_ms` (wall clock, ms since the epoch).
    Join { expires_ms: u64 },
}

/// A token as the state keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Public: the part of the token before its secret, shown in lists.
    pub id: String,
    /// Who or what it is for, as its maker said.
    pub name: String,
    pub kind: TokenKind,
    /// SHA-256 of the secret, lowercase hex.
    pub secret_sha256: String,
    pub created_ms: u64,
}

/// Tokens the state keeps at most (revoked ones leave it).
pub const TOKENS_MAX: usize = 1024;
/// Longest token name.
pub const TOKEN_NAME_MAX_BYTES: usize = 64;

impl ClusterState {
    pub(crate) fn create_token(&mut self, token: &Token) -> Result<(), CommandError> {
        let invalid = |reason: String| Err(CommandError::InvalidInput(reason));
        let hex = |text: &str, len: usize| text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(&token.id, 16) {
            return invalid("a token id is 16 hex digits".into());
        }
        if !hex(&token.secret_sha256, 64) {
            return invalid("a token's secret hash is 64 hex digits".into());
        }
        if !token.name.is_empty() {
            crate::names::check_name("token", &token.name, TOKEN_NAME_MAX_BYTES).map_err(CommandError::InvalidInput)?;
        }
        if self.tokens.contains_key(&token.id) {
            return invalid(format!("token {} exists", token.id));
        }
        if self.tokens.len() >= TOKENS_MAX {
            return invalid(format!("there are {TOKENS_MAX} tokens already: revoke some first"));
        }
        self.tokens.insert(token.id.clone(), token.clone());
        Ok(())
    }

    pub(crate) fn revoke_token(&mut self, id: &str) -> Result<(), CommandError> {
        self.tokens.remove(id).map(drop).ok_or_else(|| CommandError::UnknownToken(id.to_string()))
    }

    /// Drops join tokens that expired before `now_ms` (the proposer's clock): they can
    /// never be used again.
    pub(crate) fn forget_expired_tokens(&mut self, now_ms: u64) {
        self.tokens.retain(|_, t| !matches!(t.kind, TokenKind::Join { expires_ms } if expires_ms < now_ms));
    }
}
