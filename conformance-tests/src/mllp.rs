//! An HL7 v2 sender over MLLP, as a device integration system holds one: plain TCP or mutual
//! TLS with a client certificate, one message at a time, each answered by an ACK.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use gateway::BoxError;
use gateway::hl7v2::mllp::MllpCodec;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

/// How long a test waits for an ACK before failing.
const ACK_WAIT: Duration = Duration::from_secs(30);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One MLLP connection.
pub struct MllpSender {
    stream: Box<dyn Stream>,
    codec: MllpCodec,
    buf: BytesMut,
}

impl MllpSender {
    pub async fn plain(addr: SocketAddr) -> Result<Self, BoxError> {
        Ok(Self::over(Box::new(TcpStream::connect(addr).await?)))
    }

    /// Mutual TLS trusting `ca`, presenting `cert` and `key`.
    pub async fn tls(
        addr: SocketAddr,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, BoxError> {
        gateway::install_crypto_provider();
        let config = gateway::tls::client_config(&[ca.to_owned()], Some((cert, key)))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await?;
        let tls = connector
            .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
            .await?;
        Ok(Self::over(Box::new(tls)))
    }

    fn over(stream: Box<dyn Stream>) -> Self {
        Self {
            stream,
            codec: MllpCodec::new(16 * 1024 * 1024),
            buf: BytesMut::new(),
        }
    }

    /// Sends `message` (segments ended by CR) framed, and returns the ACK's text.
    pub async fn send(&mut self, message: &str) -> Result<String, BoxError> {
        self.send_bytes(message.as_bytes()).await
    }

    pub async fn send_bytes(&mut self, message: &[u8]) -> Result<String, BoxError> {
        let mut out = BytesMut::new();
        self.codec.encode(message, &mut out)?;
        self.write_raw(&out).await?;
        self.ack().await
    }

    /// Bytes as they are, unframed (for bad frames).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), BoxError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The next ACK, as text (Latin-1 bytes read as such, so any ACK is readable).
    pub async fn ack(&mut self) -> Result<String, BoxError> {
        let frame = tokio::time::timeout(ACK_WAIT, async {
            loop {
                if let Some(frame) = self.codec.decode(&mut self.buf)? {
                    return Ok::<_, BoxError>(Some(frame));
                }
                if self.stream.read_buf(&mut self.buf).await? == 0 {
                    return Ok(None);
                }
            }
        })
        .await
        .map_err(|_| "no ACK within 30 s")??;
        let frame = frame.ok_or("the connection closed without an ACK")?;
        Ok(match std::str::from_utf8(&frame) {
            Ok(text) => text.to_owned(),
            Err(_) => frame.iter().map(|&b| b as char).collect(),
        })
    }

    /// Whether the other end has closed the connection (reads to its end).
    pub async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(ACK_WAIT, self.stream.read_to_end(&mut rest)).await,
            Ok(Ok(_)) | Ok(Err(_))
        )
    }
}

/// An ACK read into its parts.
#[derive(Debug, Clone)]
pub struct Ack {
    /// MSA-1: AA, AE or AR.
    pub code: String,
    /// MSA-2: the acknowledged message's control id.
    pub control_id: String,
    /// Each ERR as (ERR-2 location, ERR-3.1 code, ERR-4 severity, ERR-8 text).
    pub errors: Vec<(String, String, String, String)>,
}

impl Ack {
    pub fn parse(text: &str) -> Self {
        let mut ack = Self {
            code: String::new(),
            control_id: String::new(),
            errors: Vec::new(),
        };
        for segment in text.split('\r') {
            let fields: Vec<&str> = segment.split('|').collect();
            let field = |n: usize| fields.get(n).copied().unwrap_or_default().to_owned();
            match fields[0] {
                "MSA" => {
                    ack.code = field(1);
                    ack.control_id = field(2);
                }
                "ERR" => ack.errors.push((
                    field(2),
                    field(3).split('^').next().unwrap_or_default().to_owned(),
                    field(4),
                    field(8),
                )),
                _ => {}
            }
        }
        ack
    }

    /// The ERR-2 locations, in order.
    pub fn locations(&self) -> Vec<&str> {
        self.errors.iter().map(|e| e.0.as_str()).collect()
    }
}

/// The sample messages of `conformance-tests/scenarios/hl7v2` as (file stem, message): `{{time}}`
/// replaced by `time` (an HL7 DTM), segments ended by CR.
pub fn sample_messages(time: &str) -> Result<Vec<(String, String)>, BoxError> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/hl7v2");
    let mut samples = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "hl7") {
            let text = std::fs::read_to_string(&path)?;
            let message: String = text
                .replace("{{time}}", time)
                .lines()
                .flat_map(|line| [line, "\r"])
                .collect();
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            samples.push((stem.into_owned(), message));
        }
    }
    samples.sort();
    Ok(samples)
}
