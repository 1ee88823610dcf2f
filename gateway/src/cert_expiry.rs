//! The certificates the gateway is configured with and when each expires: listed by the admin
//! API, and warned about in the log (at start, then daily) from 30 days before, so a
//! certificate is renewed before a handshake starts failing at 3 a.m.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::Config;

/// From how long before its expiry a certificate is reported as expiring.
pub const WARN_BEFORE_DAYS: i64 = 30;

/// One configured certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfiguredCertificate {
    /// What it is for, e.g. `server`, `vendor CA`, `destination 'ehr' client`.
    pub role: String,
    pub file: PathBuf,
    pub subject: String,
    /// RFC 3339.
    pub not_after: String,
    pub days_left: i64,
    pub expiring: bool,
}

/// Every certificate file of `config` by role (CA files can hold several certificates).
fn files(config: &Config) -> Vec<(String, &Path)> {
    let mut files = vec![("server".to_owned(), config.server.cert.as_path())];
    files.extend(
        config
            .server
            .vendor_ca
            .iter()
            .map(|p| ("vendor CA".to_owned(), p.as_path())),
    );
    if let Some(admin) = &config.admin {
        files.push(("admin listener".to_owned(), admin.cert.as_path()));
        files.extend(
            admin
                .client_ca
                .iter()
                .map(|p| ("admin CA".to_owned(), p.as_path())),
        );
    }
    for d in &config.destinations {
        if let Some(client_cert) = &d.client_cert {
            files.push((
                format!("destination '{}' client", d.name),
                client_cert.as_path(),
            ));
        }
        files.extend(
            d.ca.iter()
                .map(|p| (format!("destination '{}' CA", d.name), p.as_path())),
        );
    }
    files
}

/// The configured certificates with their expiry, as of `now` (Unix seconds). A file that
/// cannot be read is left out (start-up has already refused it).
pub fn inventory(config: &Config, now: i64) -> Vec<ConfiguredCertificate> {
    let mut out = Vec::new();
    for (role, file) in files(config) {
        let Ok(certs) = crate::tls::load_certs(file) else {
            continue;
        };
        for cert in certs {
            let Ok((_, x509)) = X509Certificate::from_der(cert.as_ref()) else {
                continue;
            };
            let not_after = x509.validity().not_after;
            let days_left = (not_after.timestamp() - now).div_euclid(86_400);
            out.push(ConfiguredCertificate {
                role: role.clone(),
                file: file.to_owned(),
                subject: x509.subject().to_string(),
                not_after: not_after
                    .to_datetime()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                days_left,
                expiring: days_left < WARN_BEFORE_DAYS,
            });
        }
    }
    out
}

/// Logs a warning for each configured certificate that expires within
/// [`WARN_BEFORE_DAYS`] (or has expired), now and then every day.
pub async fn warn_daily(config: Config) {
    let mut ticks = tokio::time::interval(Duration::from_secs(24 * 3600));
    loop {
        ticks.tick().await;
        for cert in inventory(&config, crate::outbox::now_ms() / 1000) {
            if cert.expiring {
                tracing::warn!(
                    role = %cert.role,
                    file = %cert.file.display(),
                    subject = %cert.subject,
                    not_after = %cert.not_after,
                    days_left = cert.days_left,
                    "certificate expires soon; renew it"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{LeafSpec, TestCa, Usage};

    #[test]
    fn a_certificate_near_its_end_is_reported_expiring() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Test CA").unwrap();
        let mut soon = LeafSpec::localhost_server();
        soon.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(10);
        let server = ca.issue(&soon).unwrap();
        let client = ca.issue(&LeafSpec::new("gw", Usage::Client)).unwrap();
        for (name, pem) in [
            ("ca.pem", &ca.cert_pem),
            ("server.pem", &server.cert_pem),
            ("client.pem", &client.cert_pem),
        ] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        let p = |f: &str| dir.path().join(f).display().to_string();
        let toml = format!(
            r#"
[server]
listen = "127.0.0.1:0"
cert = "{server}"
key = "{server}"
vendor_ca = ["{ca}"]
[[vendor]]
name = "v"
identity = "v"
models = ["M"]
[[destination]]
name = "ehr"
base_url = "https://127.0.0.1:1/fhir"
ca = ["{ca}"]
client_cert = "{client}"
client_key = "{client}"
"#,
            server = p("server.pem"),
            ca = p("ca.pem"),
            client = p("client.pem"),
        );
        std::fs::write(dir.path().join("gateway.toml"), toml).unwrap();
        let config = Config::load(&dir.path().join("gateway.toml")).unwrap();
        let listed = inventory(&config, crate::outbox::now_ms() / 1000);
        let roles: Vec<(&str, bool)> = listed
            .iter()
            .map(|c| (c.role.as_str(), c.expiring))
            .collect();
        assert_eq!(
            roles,
            [
                ("server", true),
                ("vendor CA", false),
                ("destination 'ehr' client", false),
                ("destination 'ehr' CA", false)
            ]
        );
        assert!((9..=10).contains(&listed[0].days_left), "{listed:?}");
        assert!(listed[0].subject.contains("localhost"));
    }
}
