//! Making and checking tokens. A token reads `cvt1_ID_SECRET` (API) or
//! `cvj1_ID_SECRET_CA` (join): a public id of 16 hex digits, by which the state finds it,
//! a secret of 32 hex digits (128 random bits), of which the state keeps only the SHA-256,
//! and for a join token the SHA-256 of the cluster CA's certificate, by which the joining
//! node knows it reached the cluster it was meant to join.

use crate::error::ClusterError;
use model::{ClusterState, Token, TokenKind};
use sha2::{Digest, Sha256};

const API_PREFIX: &str = "cvt1";
const JOIN_PREFIX: &str = "cvj1";

/// A new token of `kind`: what the state keeps, and the text to give its holder (once).
/// `ca_sha256` is the CA's fingerprint, which a join token carries.
pub(crate) fn mint(kind: TokenKind, name: &str, now_ms: u64, ca_sha256: &str) -> Result<(Token, String), ClusterError> {
    let id = format!("{:016x}", random()?);
    let secret = format!("{:016x}{:016x}", random()?, random()?);
    let text = match kind {
        TokenKind::Api { .. } => format!("{API_PREFIX}_{id}_{secret}"),
        TokenKind::Join { .. } => format!("{JOIN_PREFIX}_{id}_{secret}_{ca_sha256}"),
    };
    let token = Token { id, name: name.to_string(), kind, secret_sha256: sha256_hex(&secret), created_ms: now_ms };
    Ok((token, text))
}

/// The token `text` names, if its secret is right. Never says which part was wrong.
pub fn verify<'a>(state: &'a ClusterState, text: &str) -> Option<&'a Token> {
    let mut parts = text.trim().split('_');
    let (prefix, id, secret) = (parts.next()?, parts.next()?, parts.next()?);
    // A join token's CA fingerprint is for the joining node; the state knows its CA.
    let ca = parts.next();
    if parts.next().is_some() || (prefix == API_PREFIX && ca.is_some()) {
        return None;
    }
    let token = state.tokens.get(id)?;
    let prefix_fits = match token.kind {
        TokenKind::Api { .. } => prefix == API_PREFIX,
        TokenKind::Join { .. } => prefix == JOIN_PREFIX,
    };
    (prefix_fits && constant_time_eq(sha256_hex(secret).as_bytes(), token.secret_sha256.as_bytes())).then_some(token)
}

/// Whether `text` is shaped like a token and names an id `state` does not hold: one made
/// a moment ago through another node, perhaps, which catching up would show. (Ids are
/// never reused; a revoked token's is gone as well.)
pub fn unseen(state: &ClusterState, text: &str) -> bool {
    let hex = |part: &str, len: usize| part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Vec<&str> = text.trim().split('_').collect();
    let shaped = match parts[..] {
        [API_PREFIX, id, secret] => hex(id, 16) && hex(secret, 32),
        [JOIN_PREFIX, id, secret, ca] => hex(id, 16) && hex(secret, 32) && hex(ca, 64),
        _ => false,
    };
    shaped && !state.tokens.contains_key(parts[1])
}

/// The CA fingerprint a join token carries, if `text` is one.
pub fn join_token_ca(text: &str) -> Option<String> {
    let mut parts = text.trim().split('_');
    (parts.next()? == JOIN_PREFIX).then_some(())?;
    let ca = parts.nth(2)?;
    (ca.len() == 64 && ca.bytes().all(|b| b.is_ascii_hexdigit())).then(|| ca.to_ascii_lowercase())
}

fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares without stopping at the first difference, so the time taken says nothing of
/// where two secrets differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random() -> Result<u64, ClusterError> {
    getrandom::u64().map_err(|e| ClusterError::Raft(format!("no randomness from the OS: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{ClusterCommand, ClusterId, Role};

    fn state_with(token: &Token) -> ClusterState {
        let mut state = ClusterState::default();
        state.apply(&ClusterCommand::InitCluster { id: ClusterId(1) }).unwrap();
        state.apply(&ClusterCommand::CreateToken(token.clone())).unwrap();
        state
    }

    #[test]
    fn a_token_is_known_by_its_whole_text_only() {
        let (token, text) = mint(TokenKind::Api { role: Role::Operator }, "ci", 1, "").unwrap();
        let state = state_with(&token);

        assert_eq!(verify(&state, &text).map(|t| t.kind), Some(TokenKind::Api { role: Role::Operator }));
        let (prefix, rest) = text.split_once('_').unwrap();
        let mut wrong_secret = text.clone();
        let last = wrong_secret.pop().unwrap();
        wrong_secret.push(if last == '0' { '1' } else { '0' });
        assert!(verify(&state, &wrong_secret).is_none());
        assert!(verify(&state, &format!("cvj1_{rest}")).is_none(), "an API token is no join token");
        assert!(verify(&state, &format!("{text}_{}", "a".repeat(64))).is_none(), "nothing follows an API token");
        assert!(verify(&state, prefix).is_none() && verify(&state, "").is_none());
        assert!(!token.secret_sha256.contains(&text[text.len() - 32..]), "the state keeps no secret");
    }

    #[test]
    fn only_a_well_formed_token_of_an_id_not_held_is_unseen() {
        let (token, text) = mint(TokenKind::Api { role: Role::Viewer }, "", 1, "").unwrap();
        let state = state_with(&token);
        let (other, other_text) = mint(TokenKind::Api { role: Role::Viewer }, "", 1, "").unwrap();
        let (_, join_text) = mint(TokenKind::Join { expires_ms: 10 }, "", 1, &"c".repeat(64)).unwrap();
        assert!(unseen(&state, &other_text) && unseen(&state, &join_text), "made elsewhere, not seen yet");
        assert!(!unseen(&state, &text), "held");
        let wrong_secret = format!("cvt1_{}_{}", token.id, "0".repeat(32));
        assert!(!unseen(&state, &wrong_secret), "a held id with a wrong secret is known to be wrong");
        for junk in ["", "x", "Bearer", "cvt1_1234_5678", &format!("cvt1_{}_{}", other.id, "g".repeat(32))] {
            assert!(!unseen(&state, junk), "{junk:?} is no token at all");
        }
    }

    #[test]
    fn a_revoked_token_is_unknown() {
        let ca = "c".repeat(64);
        let (token, text) = mint(TokenKind::Join { expires_ms: 10 }, "", 1, &ca).unwrap();
        let mut state = state_with(&token);
        assert_eq!(join_token_ca(&text), Some(ca.clone()), "a join token names the CA");
        assert!(verify(&state, &text).is_some());
        state.apply(&ClusterCommand::RevokeToken { id: token.id.clone() }).unwrap();
        assert!(verify(&state, &text).is_none());
    }
}
