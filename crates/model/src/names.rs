//! Names users give to volumes, VMs and anti-affinity groups: checked here, in one place,
//! for every path that creates one (the API answers early; `apply` has the last word).
//!
//! A name is 1 to `NAME_MAX_BYTES` ASCII letters, digits, '-', '_' and '.', starting with a
//! letter or a digit: it never needs escaping in a URL, a file name or a command line,
//! never reads as a flag (`-x`) or a path step (`.`, `..`), and never holds a '/'.

/// Longest name of a volume or VM.
pub const NAME_MAX_BYTES: usize = 128;

/// Checks `name` as the name of a `what` ("volume", "VM", ...), with a message that says
/// what a valid one looks like.
pub fn check_name(what: &str, name: &str, max_bytes: usize) -> Result<(), String> {
    let starts_well = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_valid = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if starts_well && rest_valid && name.len() <= max_bytes {
        return Ok(());
    }
    Err(format!(
        "{name:?} is not a valid {what} name: 1 to {max_bytes} letters, digits, '-', '_' and '.', starting with a \
         letter or a digit"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_their_place_or_read_as_flags_are_refused() {
        for bad in ["", ".", "..", "../vms/web", "a/b", "-rf", "_x", ".hidden", "a b", "a%2F", "é", "a\nb", "a\0"] {
            assert!(check_name("volume", bad, NAME_MAX_BYTES).is_err(), "{bad:?}");
        }
        assert!(check_name("volume", &"a".repeat(NAME_MAX_BYTES + 1), NAME_MAX_BYTES).is_err());
    }

    #[test]
    fn ordinary_names_pass() {
        for good in ["web", "web-1", "db_2.disk0", "0", "A.b-c_d", &"a".repeat(NAME_MAX_BYTES)] {
            assert_eq!(check_name("volume", good, NAME_MAX_BYTES), Ok(()), "{good:?}");
        }
    }
}
