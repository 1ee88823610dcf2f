//! Certificates an operator has revoked at the gateway, by SHA-256 fingerprint: a device that
//! was lost or stolen is shut out at once (its next request, on any connection), without a
//! restart and without waiting for the CA's next CRL. Kept in a small JSON file, replaced
//! atomically, so a revocation survives a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// A certificate's SHA-256 fingerprint (of its DER).
pub type Fingerprint = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// One revocation, as listed by the admin API and kept in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// Lower-case hex, no separators.
    pub sha256: String,
    pub reason: String,
    /// RFC 3339.
    pub revoked_at: String,
    /// The admin certificate identity that revoked it.
    pub revoked_by: String,
}

pub struct RevokedCertificates {
    path: PathBuf,
    entries: RwLock<BTreeMap<Fingerprint, Revocation>>,
}

impl RevokedCertificates {
    /// Reads the file (none yet: nothing revoked).
    pub fn open(path: &Path) -> Result<Self, RevocationError> {
        let entries = match std::fs::read(path) {
            Ok(bytes) => {
                let list: Vec<Revocation> =
                    serde_json::from_slice(&bytes).map_err(|source| RevocationError::Format {
                        path: path.to_owned(),
                        source,
                    })?;
                list.into_iter()
                    .filter_map(|r| Some((parse_fingerprint(&r.sha256)?, r)))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(RevocationError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Ok(Self {
            path: path.to_owned(),
            entries: RwLock::new(entries),
        })
    }

    pub fn is_revoked(&self, fingerprint: &Fingerprint) -> bool {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(fingerprint)
    }

    pub fn list(&self) -> Vec<Revocation> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Revokes `fingerprint` (durably, before it returns); false if it already was.
    /// Blocking (a file write and fsync).
    pub fn revoke(
        &self,
        fingerprint: Fingerprint,
        reason: &str,
        revoked_by: &str,
    ) -> Result<bool, RevocationError> {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.contains_key(&fingerprint) {
            return Ok(false);
        }
        let revoked_at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut next = entries.clone();
        next.insert(
            fingerprint,
            Revocation {
                sha256: hex(&fingerprint),
                reason: reason.to_owned(),
                revoked_at,
                revoked_by: revoked_by.to_owned(),
            },
        );
        self.store(&next)?;
        *entries = next;
        Ok(true)
    }

    /// Takes a revocation back; false if there was none. Blocking.
    pub fn restore(&self, fingerprint: &Fingerprint) -> Result<bool, RevocationError> {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if !entries.contains_key(fingerprint) {
            return Ok(false);
        }
        let mut next = entries.clone();
        next.remove(fingerprint);
        self.store(&next)?;
        *entries = next;
        Ok(true)
    }

    /// Writes `entries` to a temporary file, syncs it and renames it over the file.
    fn store(&self, entries: &BTreeMap<Fingerprint, Revocation>) -> Result<(), RevocationError> {
        let io = |source| RevocationError::Io {
            path: self.path.clone(),
            source,
        };
        let list: Vec<&Revocation> = entries.values().collect();
        let json = serde_json::to_vec_pretty(&list).map_err(|source| RevocationError::Format {
            path: self.path.clone(),
            source,
        })?;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let partial = self.path.with_extension("partial");
        let mut file = std::fs::File::create(&partial).map_err(io)?;
        std::io::Write::write_all(&mut file, &json).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&partial, &self.path).map_err(io)?;
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// The SHA-256 fingerprint of a DER certificate.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    use sha2::Digest;
    let mut out = [0; 32];
    out.copy_from_slice(&sha2::Sha256::digest(der));
    out
}

/// A fingerprint written as hex, with or without `:` separators, in either case.
pub fn parse_fingerprint(text: &str) -> Option<Fingerprint> {
    let digits: Vec<u8> = text.bytes().filter(|&b| b != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

pub fn hex(fingerprint: &Fingerprint) -> String {
    fingerprint.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_read_with_or_without_colons() {
        let f = fingerprint(b"certificate");
        let plain = hex(&f);
        assert_eq!(parse_fingerprint(&plain), Some(f));
        let colons: Vec<String> = plain
            .as_bytes()
            .chunks(2)
            .map(|p| String::from_utf8(p.to_vec()).unwrap().to_uppercase())
            .collect();
        assert_eq!(parse_fingerprint(&colons.join(":")), Some(f));
        assert_eq!(parse_fingerprint("abc"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
    }

    #[test]
    fn revocations_are_kept_across_a_restart_and_can_be_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.json");
        let revoked = RevokedCertificates::open(&path).unwrap();
        let lost = fingerprint(b"lost console");
        assert!(!revoked.is_revoked(&lost));
        assert!(revoked.revoke(lost, "console stolen", "ops-admin").unwrap());
        assert!(!revoked.revoke(lost, "again", "ops-admin").unwrap());
        assert!(revoked.is_revoked(&lost));

        let reopened = RevokedCertificates::open(&path).unwrap();
        assert!(reopened.is_revoked(&lost));
        assert_eq!(reopened.list()[0].reason, "console stolen");
        assert!(reopened.restore(&lost).unwrap());
        assert!(!reopened.restore(&lost).unwrap());
        assert!(!RevokedCertificates::open(&path).unwrap().is_revoked(&lost));
    }
}
