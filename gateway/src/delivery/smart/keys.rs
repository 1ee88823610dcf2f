//! The gateway's SMART signing keys: each destination's keys load once at start, the first
//! signs the client assertions, and all of them are published as a JWKS for the EHR to
//! register, so a new key can be registered before it takes over from the old one.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyOperations, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::SmartError;

/// A private key and what SMART asks of it: ES384 for EC P-384, RS384 for RSA.
pub struct SigningKey {
    encoding: EncodingKey,
    algorithm: Algorithm,
    /// Its public half, with `kid` (the RFC 7638 thumbprint), `alg` and `use`.
    public: Jwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a PKCS#8 PEM key (EC P-384 or RSA) and proves it can sign.
    pub fn load(path: &Path) -> Result<Self, SmartError> {
        let bad = |reason: String| SmartError::Key {
            path: path.to_owned(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let (encoding, algorithm) = match EncodingKey::from_ec_pem(&pem) {
            Ok(key) => (key, Algorithm::ES384),
            Err(_) => match EncodingKey::from_rsa_pem(&pem) {
                Ok(key) => (key, Algorithm::RS384),
                Err(e) => {
                    return Err(bad(format!(
                        "not a PKCS#8 PEM EC P-384 or RSA private key ({e})"
                    )));
                }
            },
        };
        // A P-256 key parses as EC too, but cannot sign ES384: found here, not at the first token.
        jsonwebtoken::encode(&Header::new(algorithm), &serde_json::json!({}), &encoding).map_err(
            |e| {
                bad(format!(
                    "cannot sign {algorithm:?} ({e}): SMART asks for EC P-384 or RSA keys"
                ))
            },
        )?;
        let mut public = Jwk::from_encoding_key(&encoding, algorithm)
            .map_err(|e| bad(format!("public key: {e}")))?;
        let kid = public
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| bad(format!("thumbprint: {e}")))?;
        public.common.key_id = Some(kid);
        public.common.public_key_use = Some(PublicKeyUse::Signature);
        public.common.key_operations = Some(vec![KeyOperations::Verify]);
        Ok(Self {
            encoding,
            algorithm,
            public,
        })
    }

    pub fn kid(&self) -> &str {
        self.public.common.key_id.as_deref().unwrap_or_default()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// A signed JWT of `claims`, with this key's `kid`.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, SmartError> {
        let mut header = Header::new(self.algorithm);
        header.typ = Some("JWT".into());
        header.kid = Some(self.kid().to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| SmartError::Assertion(e.to_string()))
    }
}

/// One destination's keys: the first signs, all are published.
#[derive(Debug)]
pub struct SigningKeys {
    keys: Vec<SigningKey>,
}

impl SigningKeys {
    pub fn load(paths: &[PathBuf]) -> Result<Self, SmartError> {
        let keys = paths
            .iter()
            .map(|p| SigningKey::load(p))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(SmartError::Assertion("no signing key configured".into()));
        }
        Ok(Self { keys })
    }

    /// The key that signs now.
    pub fn current(&self) -> &SigningKey {
        &self.keys[0]
    }

    pub fn public_keys(&self) -> impl Iterator<Item = &Jwk> {
        self.keys.iter().map(|k| &k.public)
    }
}

/// The JWKS of every SMART destination's keys (each key once, in configuration order): what an
/// EHR registers for the gateway, served on the admin listener and written by `gateway jwks`.
pub fn jwks(config: &crate::config::Config) -> Result<JwkSet, SmartError> {
    let mut set = JwkSet { keys: Vec::new() };
    for smart in config.destinations.iter().filter_map(|d| d.smart.as_ref()) {
        for jwk in SigningKeys::load(&smart.keys)?.public_keys() {
            if !set
                .keys
                .iter()
                .any(|k| k.common.key_id == jwk.common.key_id)
            {
                set.keys.push(jwk.clone());
            }
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_key(dir: &Path, name: &str, alg: &'static rcgen::SignatureAlgorithm) -> PathBuf {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, key.serialize_pem()).unwrap();
        path
    }

    #[test]
    fn ec_p384_signs_es384_and_rsa_signs_rs384() {
        let dir = tempfile::tempdir().unwrap();
        let ec = write_key(dir.path(), "ec.pem", &rcgen::PKCS_ECDSA_P384_SHA384);
        let rsa = write_key(dir.path(), "rsa.pem", &rcgen::PKCS_RSA_SHA384);
        let keys = SigningKeys::load(&[ec, rsa]).unwrap();
        assert_eq!(keys.current().algorithm(), Algorithm::ES384);
        let published: Vec<&Jwk> = keys.public_keys().collect();
        assert_eq!(published.len(), 2, "both keys published during a rotation");
        assert_eq!(
            published[1].common.key_algorithm,
            Some(jsonwebtoken::jwk::KeyAlgorithm::RS384)
        );
        // The published half verifies what the current key signs.
        let token = keys
            .current()
            .sign(&serde_json::json!({"sub": "x"}))
            .unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(keys.current().kid()));
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES384);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let key = jsonwebtoken::DecodingKey::from_jwk(published[0]).unwrap();
        jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).unwrap();
    }

    #[test]
    fn a_key_smart_cannot_use_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let p256 = write_key(dir.path(), "p256.pem", &rcgen::PKCS_ECDSA_P256_SHA256);
        let e = SigningKey::load(&p256).unwrap_err().to_string();
        assert!(e.contains("cannot sign ES384"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a key").unwrap();
        let e = SigningKey::load(&garbage).unwrap_err().to_string();
        assert!(e.contains("not a PKCS#8 PEM"), "{e}");
    }
}
