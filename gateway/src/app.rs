//! The gateway assembled from its configuration: everything that can fail is checked in
//! [`Gateway::from_config_file`], before the listener opens.

use std::path::Path;
use std::sync::Arc;

use mappings::Mappings;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};
use crate::delivery::{Destination, DirectDelivery};
use crate::ingress::{IngressSettings, Vendors, build_stack};
use crate::server::{ServeOptions, serve_mtls};
use crate::validation::Schemas;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("mapping tables: {0}")]
    Mappings(#[from] mappings::TableError),
    #[error("server TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Destination(#[from] crate::delivery::client::ClientError),
    #[error(transparent)]
    Schema(#[from] crate::validation::SchemaError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A checked, ready-to-serve gateway.
pub struct Gateway {
    config: Config,
    tls: Arc<rustls::ServerConfig>,
    mappings: Arc<Mappings>,
    schemas: Schemas,
    destinations: Vec<Destination>,
}

impl Gateway {
    pub fn from_config_file(path: &Path) -> Result<Self, StartError> {
        Self::from_config(Config::load(path)?)
    }

    pub fn from_config(config: Config) -> Result<Self, StartError> {
        let mappings = match &config.mappings.dir {
            Some(dir) => Mappings::load_dir(dir)?,
            None => Mappings::embedded()?,
        };
        let tls = crate::tls::server_config(
            &config.server.cert,
            &config.server.key,
            &config.server.vendor_ca,
        )?;
        let destinations = config
            .destinations
            .iter()
            .map(Destination::from_settings)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            schemas: Schemas::embedded()?,
            mappings: Arc::new(mappings),
            tls,
            destinations,
            config,
        })
    }

    /// Listens and serves until `shutdown` completes, then drains open requests.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), StartError> {
        let addr = self.config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        let server = &self.config.server;
        let settings = IngressSettings {
            request_timeout: server.request_timeout,
            max_body_bytes: server.max_body_bytes,
            max_concurrent_requests: server.max_concurrent_requests,
            max_future_skew: self.config.readings.max_future_skew,
        };
        let stack = build_stack(
            settings,
            Vendors::new(&self.config.vendors),
            self.mappings.clone(),
            self.schemas.clone(),
            Arc::new(DirectDelivery::new(self.destinations)),
        );
        let options = ServeOptions {
            handshake_timeout: server.handshake_timeout,
            header_read_timeout: server.header_read_timeout,
            max_connections: server.max_connections,
            ..ServeOptions::default()
        };
        tracing::info!(
            listen = %local,
            vendors = self.config.vendors.len(),
            destinations = self.config.destinations.len(),
            families = self.mappings.families().len(),
            "gateway listening (mutual TLS)"
        );
        serve_mtls(listener, self.tls, stack, options, shutdown).await;
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
