//! Password files: read only when nobody but their owner can read them.
//!
//! Owns: the mode check and the trimming every password file gets (BMC
//! credentials, the PostgreSQL store's password). Must not: log what it
//! reads.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The password in `path`, without its trailing newline. An error when
/// the file lets its group or others read it, or is empty.
pub fn read_private(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {:o} lets others read it: chmod 600",
            mode & 0o777
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let pw = text.trim_end_matches(['\n', '\r']).to_string();
    if pw.is_empty() {
        return Err("empty".into());
    }
    Ok(pw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_owner_only_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_private(&p).unwrap_err();
        assert!(e.contains("mode 644"), "{e}");
        assert!(!e.contains("s3cret"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_private(&p).unwrap(), "s3cret");
        std::fs::write(&p, "\n").unwrap();
        assert_eq!(read_private(&p).unwrap_err(), "empty");
    }
}
