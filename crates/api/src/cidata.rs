//! cloud-init's NoCloud seed, made in-process: a small FAT file system labelled CIDATA that
//! holds `meta-data`, `user-data` and `network-config`, which cloud-init looks for on any
//! disk of the VM. Every value is checked, and written into the YAML as a JSON string
//! (a YAML double-quoted scalar), so nothing a user gives can change the documents' shape.

use crate::v1;

/// The seed volume's size.
pub const SEED_BYTES: u64 = 1 << 20;
/// The most `user-data` a seed holds (the file system has room for more, cloud-init needs
/// far less).
pub const USER_DATA_MAX_BYTES: usize = 256 << 10;
/// SSH keys one VM may be given.
const SSH_KEYS_MAX: usize = 64;
/// The longest SSH public key line taken (an RSA 16384-bit key is under 3 KiB).
const SSH_KEY_MAX_BYTES: usize = 8 << 10;
/// All of a VM's keys together: with the user-data, well inside the seed.
const KEYS_MAX_BYTES: usize = 128 << 10;

/// Checks what a user asked of cloud-init; the reason if something is refused.
pub fn check(request: &v1::CloudInit) -> Result<(), String> {
    if let Some(hostname) = &request.hostname {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        if hostname.len() > 253 || !hostname.split('.').all(label_ok) {
            return Err(format!(
                "{hostname:?} is not a host name: labels of letters, digits and '-' (not first or last), \
                 up to 63 characters each, joined by '.'"
            ));
        }
    }
    if let Some(user) = &request.user {
        let first_ok = user.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = user.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if user.len() > 32 || !first_ok || !rest_ok {
            return Err(format!(
                "{user:?} is not a user name: up to 32 lower-case letters, digits, '_' and '-', starting with a \
                 letter or '_'"
            ));
        }
    }
    if request.ssh_keys.len() > SSH_KEYS_MAX {
        return Err(format!("{} SSH keys is more than {SSH_KEYS_MAX}", request.ssh_keys.len()));
    }
    for key in &request.ssh_keys {
        let kind = key.split_whitespace().next().unwrap_or_default();
        let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
        let printable = key.chars().all(|c| c == ' ' || c.is_ascii_graphic());
        if !known || !printable || key.len() > SSH_KEY_MAX_BYTES || key.split_whitespace().count() < 2 {
            let shown: String = key.chars().take(40).collect();
            return Err(format!(
                "{shown:?} is not an SSH public key (one line: its type, such as ssh-ed25519, then the key)"
            ));
        }
    }
    if let Some(user_data) = &request.user_data {
        if user_data.len() > USER_DATA_MAX_BYTES {
            return Err(format!("user-data of {} bytes is more than {USER_DATA_MAX_BYTES}", user_data.len()));
        }
        if request.user.is_some() {
            return Err("a user to make goes in your own user-data (users:), not beside it".into());
        }
    }
    let keys: usize = request.ssh_keys.iter().map(String::len).sum();
    if keys > KEYS_MAX_BYTES {
        return Err(format!("{keys} bytes of SSH keys is more than {KEYS_MAX_BYTES}"));
    }
    Ok(())
}

/// A YAML double-quoted scalar of `text`.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// The NoCloud `meta-data`: the instance id (kept while the VM lives, wherever it runs, so
/// cloud-init runs its first boot once), the host name, and the keys of the image's
/// default user when no user is named.
pub fn meta_data(request: &v1::CloudInit, instance_id: &str) -> String {
    let mut text = format!("instance-id: {}\n", quoted(instance_id));
    if let Some(hostname) = &request.hostname {
        text.push_str(&format!("local-hostname: {}\n", quoted(hostname)));
    }
    if request.user.is_none() && !request.ssh_keys.is_empty() {
        text.push_str("public-keys:\n");
        for key in &request.ssh_keys {
            text.push_str(&format!("  - {}\n", quoted(key)));
        }
    }
    text
}

/// The `user-data`: the user's own, or a cloud-config that names the host and makes the
/// user (with sudo and the SSH keys).
pub fn user_data(request: &v1::CloudInit) -> String {
    if let Some(own) = &request.user_data {
        return own.clone();
    }
    let mut text = String::from("#cloud-config\n");
    if let Some(hostname) = &request.hostname {
        text.push_str(&format!("hostname: {}\n", quoted(hostname)));
    }
    if let Some(user) = &request.user {
        text.push_str("users:\n");
        text.push_str(&format!("  - name: {}\n", quoted(user)));
        text.push_str("    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n    shell: /bin/bash\n    lock_passwd: true\n");
        if !request.ssh_keys.is_empty() {
            text.push_str("    ssh_authorized_keys:\n");
            for key in &request.ssh_keys {
                text.push_str(&format!("      - {}\n", quoted(key)));
            }
        }
    }
    text
}

/// The `network-config` (version 2): DHCP on every Ethernet interface.
pub fn network_config() -> String {
    "version: 2\nethernets:\n  all:\n    match:\n      name: \"e*\"\n    dhcp4: true\n".to_string()
}

/// The seed's bytes: a FAT file system of `SEED_BYTES` labelled CIDATA with the three files.
pub fn seed(request: &v1::CloudInit, instance_id: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut disk = std::io::Cursor::new(vec![0u8; SEED_BYTES as usize]);
    fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "))?;
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        let files = [
            ("meta-data", meta_data(request, instance_id)),
            ("user-data", user_data(request)),
            ("network-config", network_config()),
        ];
        for (name, text) in files {
            let mut file = fs.root_dir().create_file(name)?;
            file.truncate()?;
            file.write_all(text.as_bytes())?;
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked() -> v1::CloudInit {
        v1::CloudInit {
            hostname: Some("web-1.example".into()),
            user: None,
            ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBcTj7 admin@laptop".into()],
            user_data: None,
        }
    }

    #[test]
    fn the_seed_is_a_cidata_file_system_with_the_three_files() {
        use std::io::Read;
        let bytes = seed(&asked(), "iid-web-1").unwrap();
        assert_eq!(bytes.len() as u64, SEED_BYTES);
        let mut disk = std::io::Cursor::new(bytes);
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let read = |name: &str| {
            let mut text = String::new();
            fs.root_dir().open_file(name).unwrap().read_to_string(&mut text).unwrap();
            text
        };
        let meta = read("meta-data");
        assert!(meta.contains("instance-id: \"iid-web-1\""), "{meta}");
        assert!(meta.contains("local-hostname: \"web-1.example\""), "{meta}");
        assert!(
            meta.contains("public-keys:\n  - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBcTj7 admin@laptop\""),
            "{meta}"
        );
        assert!(read("user-data").starts_with("#cloud-config\nhostname: \"web-1.example\""));
        assert!(read("network-config").contains("dhcp4: true"));
    }

    #[test]
    fn a_named_user_gets_the_keys_and_a_users_own_user_data_is_kept_as_it_is() {
        let with_user = v1::CloudInit { user: Some("ops".into()), ..asked() };
        let data = user_data(&with_user);
        assert!(data.contains("  - name: \"ops\"\n") && data.contains("ssh_authorized_keys:\n      - \"ssh-ed25519"));
        assert!(!meta_data(&with_user, "i").contains("public-keys"), "the keys are the named user's");
        let own = v1::CloudInit { user_data: Some("#cloud-config\nruncmd: [true]\n".into()), ..asked() };
        assert_eq!(user_data(&own), "#cloud-config\nruncmd: [true]\n");
    }

    #[test]
    fn nothing_a_user_gives_can_change_the_documents_shape() {
        let bad = |change: fn(&mut v1::CloudInit)| {
            let mut request = asked();
            change(&mut request);
            check(&request).unwrap_err()
        };
        assert!(bad(|r| r.hostname = Some("web\ninstance-id: x".into())).contains("not a host name"));
        assert!(bad(|r| r.hostname = Some("-web".into())).contains("not a host name"));
        assert!(bad(|r| r.user = Some("Root Admin".into())).contains("not a user name"));
        assert!(bad(|r| r.ssh_keys = vec!["ssh-rsa AAAA\nusers: []".into()]).contains("not an SSH public key"));
        assert!(bad(|r| r.ssh_keys = vec!["hello".into()]).contains("not an SSH public key"));
        assert!(bad(|r| r.ssh_keys = vec!["ssh-rsa AAAA x\u{7f}".into()]).contains("not an SSH public key"));
        assert!(bad(|r| {
            r.user = Some("ops".into());
            r.user_data = Some("#cloud-config\n".into())
        })
        .contains("your own user-data"));
        assert!(bad(|r| r.user_data = Some("x".repeat(USER_DATA_MAX_BYTES + 1))).contains("more than"));
        assert_eq!(check(&asked()), Ok(()));
        // A quote or backslash in a key's comment stays inside its string.
        let odd = v1::CloudInit { ssh_keys: vec!["ssh-ed25519 AAAA \"x\\y".into()], ..asked() };
        assert!(meta_data(&odd, "i").contains(r#"  - "ssh-ed25519 AAAA \"x\\y""#));
    }
}
