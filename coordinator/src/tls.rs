//! The coordinator's TLS (rustls): its certificate and key, and optionally the CA that client
//! certificates must chain to (mutual TLS). Clients' side: `shardmerge_worker::client`.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::error::{Error, Result};

/// `--tls-cert`, `--tls-key`, `--tls-client-ca` of `shardmerge coordinator`.
#[derive(Clone, Debug, Default)]
pub struct ServerTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

fn read(p: &Path, what: &str) -> Result<Vec<u8>> {
    let b = std::fs::read(p).map_err(|e| {
        Error::usage(
            p.display().to_string(),
            format!("cannot read the {what}: {e}"),
        )
    })?;
    if !b.windows(10).any(|w| w == b"-----BEGIN") {
        return Err(Error::usage(
            p.display().to_string(),
            format!("the {what} is not PEM (expected a `-----BEGIN ...` block)"),
        ));
    }
    Ok(b)
}

impl ServerTls {
    /// The server's TLS configuration; `None` when no certificate is given (plain text).
    pub fn config(&self) -> Result<Option<ServerTlsConfig>> {
        let (cert, key) = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => (c, k),
            (None, None) => {
                if self.client_ca.is_some() {
                    return Err(Error::usage(
                        "--tls-client-ca",
                        "needs --tls-cert and --tls-key (mutual TLS is TLS first)",
                    ));
                }
                return Ok(None);
            }
            _ => {
                return Err(Error::usage(
                    "--tls-cert/--tls-key",
                    "they go together: give both or neither",
                ))
            }
        };
        let identity = Identity::from_pem(
            read(cert, "certificate (--tls-cert)")?,
            read(key, "private key (--tls-key)")?,
        );
        let mut cfg = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            cfg = cfg
                .client_ca_root(Certificate::from_pem(read(
                    ca,
                    "client CA certificate (--tls-client-ca)",
                )?))
                .client_auth_optional(false);
        }
        Ok(Some(cfg))
    }
}
