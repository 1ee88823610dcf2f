//! The MLLP listener: HL7 v2 messages in, one ACK out for each, on the same observation path as
//! `POST /v1/observations`.
//!
//! Mutual TLS with the HTTPS listener's certificates and vendor identities by default; plain TCP
//! only for a closed device network, where one configured vendor is every connection's. Each
//! connection handles one message at a time (MLLP senders wait for the ACK), so the work in
//! flight is bounded by the connection cap. A silent connection is closed after the idle
//! timeout, a message that does not finish arriving after the read timeout, a frame over the
//! size limit at once. Logs name connections, vendors and ACK codes, never message content.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{Decoder, Encoder};
use tower::ServiceExt;

use super::ack::{self, AckCode, Severity};
use super::er7::{self, Er7Error, ErrorCode, Message};
use super::mllp::{MllpCodec, MllpError};
use super::pcd01::{self, Header, Pcd01Settings, Places, Refusal};
use crate::ingress::client_identity::{LiveVendors, VendorPolicy};
use crate::ingress::rescue::refusal_of;
use crate::ingress::stack::ObservationPath;
use crate::outcome::ApiError;
use crate::reload::LiveMappings;
use crate::server::LiveTls;

/// How the listener runs (from `[hl7v2]` and `[server]`).
#[derive(Debug, Clone)]
pub struct MllpOptions {
    pub max_frame_bytes: usize,
    pub idle_timeout: Duration,
    pub read_timeout: Duration,
    pub handshake_timeout: Duration,
    /// How long one message may take from its last byte to its ACK.
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub pcd01: Pcd01Settings,
}

/// Who the connections are.
#[derive(Clone)]
pub enum MllpTransport {
    /// Mutual TLS; the certificate names the vendor.
    Tls { tls: LiveTls, vendors: LiveVendors },
    /// Plain TCP on a closed device network: every connection is the vendor named `name`.
    Plain { vendors: LiveVendors, name: String },
}

/// What every connection shares.
#[derive(Clone)]
pub struct MllpParts {
    pub path: ObservationPath,
    pub mappings: LiveMappings,
    pub options: Arc<MllpOptions>,
}

/// Serves MLLP on `listener` until `shutdown` completes; open connections end with it.
pub async fn serve(
    listener: TcpListener,
    transport: MllpTransport,
    parts: MllpParts,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(parts.options.max_connections));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    while let Some((tcp, remote, permit)) =
        crate::server::next_connection(&listener, Some(&permits), &mut shutdown, "MLLP").await
    {
        let transport = transport.clone();
        let parts = parts.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let connection = async {
                let sender = match transport {
                    MllpTransport::Plain { vendors, name } => {
                        converse(tcp, remote, Sender::Plain { vendors, name }, &parts).await;
                        return;
                    }
                    MllpTransport::Tls { tls, vendors } => {
                        let acceptor = TlsAcceptor::from(tls.load_full());
                        let Some((stream, Some(peer))) = crate::server::handshake(
                            &acceptor,
                            tcp,
                            remote,
                            parts.options.handshake_timeout,
                            false,
                        )
                        .await
                        else {
                            return;
                        };
                        (stream, Sender::Certificate { vendors, peer })
                    }
                };
                converse(sender.0, remote, sender.1, &parts).await;
            };
            tokio::select! {
                _ = connection => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
        });
    }
    let _ = stop.send(true);
}

/// Who a connection posts as, looked up again for every message: a certificate revoked, or a
/// vendor removed by a reload, is not taken from its next message on.
enum Sender {
    Certificate {
        vendors: LiveVendors,
        peer: crate::peer::PeerIdentity,
    },
    Plain {
        vendors: LiveVendors,
        name: String,
    },
}

impl Sender {
    fn vendor(&self) -> Result<Arc<VendorPolicy>, String> {
        match self {
            Self::Certificate { vendors, peer } => {
                vendors.load().for_peer(peer).map_err(|e| e.to_string())
            }
            Self::Plain { vendors, name } => vendors.load().by_name(name).ok_or_else(|| {
                format!("hl7v2.plain_vendor '{name}' is no longer a configured vendor")
            }),
        }
    }
}

/// One connection: frames in, an ACK for each, until the sender closes or a limit is hit.
async fn converse<S>(mut stream: S, remote: SocketAddr, sender: Sender, parts: &MllpParts)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let vendor = match sender.vendor() {
        Ok(vendor) => vendor,
        Err(refused) => {
            tracing::info!(%remote, reason = %refused, "MLLP connection refused: not a vendor");
            return;
        }
    };
    let options = &parts.options;
    let mut codec = MllpCodec::new(options.max_frame_bytes);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    tracing::info!(%remote, vendor = %vendor.name, "MLLP connection open");
    // When the frame being read began: it must be complete by then plus the read timeout,
    // however slowly its bytes trickle in.
    let mut frame_began: Option<tokio::time::Instant> = None;
    let ended = loop {
        let frame = match codec.decode(&mut buf) {
            Ok(Some(frame)) => {
                frame_began = None;
                frame
            }
            Ok(None) => {
                let now = tokio::time::Instant::now();
                let deadline = if MllpCodec::in_frame(&buf) {
                    *frame_began.get_or_insert(now) + options.read_timeout
                } else {
                    now + options.idle_timeout
                };
                match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
                    Err(_) => break "timed out",
                    Ok(Err(_)) => break "read failed",
                    Ok(Ok(0)) => {
                        break match codec.decode_eof(&mut buf) {
                            Err(MllpError::Truncated) => "closed mid-frame",
                            _ => "closed by the sender",
                        };
                    }
                    Ok(Ok(_)) => continue,
                }
            }
            Err(error) => {
                // The stream cannot be re-synchronised: say why once, then close.
                let refusal = Er7Error::new(ErrorCode::SegmentSequence, None, error.to_string());
                reject_and_close(&mut stream, &ack::unreadable_header(), &refusal, options).await;
                break match error {
                    MllpError::TooLarge(_) => "frame too large",
                    _ => "bytes outside a frame",
                };
            }
        };
        let vendor = match sender.vendor() {
            Ok(vendor) => vendor,
            Err(refused) => {
                tracing::info!(%remote, reason = %refused, "MLLP sender no longer accepted; connection closed");
                let refusal = Er7Error::new(
                    ErrorCode::UnknownKeyIdentifier,
                    None,
                    format!("this connection is no longer accepted: {refused}"),
                );
                reject_and_close(&mut stream, &header_of(&frame), &refusal, options).await;
                break "sender no longer accepted";
            }
        };
        let Some(answer) = handle(frame, &vendor, parts).await else {
            continue;
        };
        if send(&mut stream, &answer, options.read_timeout)
            .await
            .is_err()
        {
            break "ACK not written";
        }
    };
    let _ = stream.shutdown().await;
    tracing::info!(%remote, vendor = %vendor.name, reason = ended, "MLLP connection closed");
}

/// The last answer on a connection about to close: AR with `refusal`, sent if the peer reads
/// it in time.
async fn reject_and_close<S: AsyncWrite + Unpin>(
    stream: &mut S,
    header: &Header,
    refusal: &Er7Error,
    options: &MllpOptions,
) {
    let answer = ack::write(
        header,
        AckCode::Reject,
        &[(Severity::Error, refusal)],
        &new_control_id(),
        time::OffsetDateTime::now_utc(),
    );
    let _ = send(stream, &answer, options.read_timeout).await;
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    message: &[u8],
    limit: Duration,
) -> Result<(), ()> {
    let mut out = BytesMut::with_capacity(message.len() + 3);
    MllpCodec::new(usize::MAX)
        .encode(message, &mut out)
        .map_err(|_| ())?;
    match tokio::time::timeout(limit, async {
        stream.write_all(&out).await?;
        stream.flush().await
    })
    .await
    {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// The MSH of `frame` as far as it can be read, for answering it.
fn header_of(frame: &[u8]) -> Header {
    match er7::decode(frame) {
        Ok((text, delimiters, charset)) => match Message::parse(&text, delimiters) {
            Ok(message) => Header::read(&message, charset),
            Err(_) => ack::unreadable_header(),
        },
        Err(_) => ack::unreadable_header(),
    }
}

fn new_control_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// One message -> its ACK, as MSH-15 and MSH-16 ask for it (None: the sender asked for none
/// in this case). A frame whose MSH cannot be read is always answered.
pub async fn handle(
    frame: Bytes,
    vendor: &Arc<VendorPolicy>,
    parts: &MllpParts,
) -> Option<Vec<u8>> {
    let now = time::OffsetDateTime::now_utc();
    let control_id = new_control_id();
    let refuse = |header: &Header, code: AckCode, errors: &[Er7Error]| {
        let problems: Vec<(Severity, &Er7Error)> =
            errors.iter().map(|e| (Severity::Error, e)).collect();
        ack::respond(header, code, &problems, &control_id, now)
    };
    let (text, delimiters, charset) = match er7::decode(&frame) {
        Ok(decoded) => decoded,
        Err(error) => {
            record(AckCode::Reject);
            return refuse(&ack::unreadable_header(), AckCode::Reject, &[error]);
        }
    };
    let message = match Message::parse(&text, delimiters) {
        Ok(message) => message,
        Err(error) => {
            let header = Header {
                delimiters,
                charset,
                ..ack::unreadable_header()
            };
            record(AckCode::Reject);
            return refuse(&header, AckCode::Reject, &[error]);
        }
    };
    let header = Header::read(&message, charset);
    let mappings = parts.mappings.load();
    let converted = match pcd01::convert(&message, &header, &mappings, &parts.options.pcd01) {
        Ok(converted) => converted,
        Err((refusal, errors)) => {
            let code = match refusal {
                Refusal::Reject => AckCode::Reject,
                Refusal::Error => AckCode::Error,
            };
            record(code);
            return refuse(&header, code, &errors);
        }
    };
    let mut request = Request::new(converted.batch);
    if let Ok(id) = http::HeaderValue::from_str(&control_id) {
        request.headers_mut().insert("x-request-id", id);
    }
    request.extensions_mut().insert(vendor.clone());
    let outcome = tokio::time::timeout(
        parts.options.request_timeout,
        parts.path.clone().oneshot(request),
    )
    .await;
    let (code, errors) = match outcome {
        Ok(Ok(response)) if response.status().is_success() => {
            tracing::debug!(vendor = %vendor.name, readings = converted.readings, "HL7 v2 message accepted");
            let warnings: Vec<(Severity, &Er7Error)> = converted
                .warnings
                .iter()
                .map(|w| (Severity::Warning, w))
                .collect();
            record(AckCode::Accept);
            return ack::respond(&header, AckCode::Accept, &warnings, &control_id, now);
        }
        Ok(Ok(response)) => {
            tracing::warn!(status = %response.status(), "HL7 v2 message answered without success");
            (
                AckCode::Reject,
                vec![Er7Error::new(
                    ErrorCode::InternalError,
                    None,
                    "the message was not accepted; resend it later",
                )],
            )
        }
        Ok(Err(error)) => from_refusal(&refusal_of(error), &converted.places),
        Err(_) => (
            AckCode::Reject,
            vec![Er7Error::new(
                ErrorCode::InternalError,
                None,
                "the gateway took too long to record the message; resending it is harmless",
            )],
        ),
    };
    record(code);
    refuse(&header, code, &errors)
}

/// An HTTP-style refusal of the batch as ERR segments at the HL7 fields the pointers came from:
/// 4xx is the sender's to fix (AE), 5xx is the gateway's (AR: resend later).
fn from_refusal(refusal: &ApiError, places: &Places) -> (AckCode, Vec<Er7Error>) {
    let server_side = refusal.status.is_server_error();
    let errors = refusal
        .issues
        .iter()
        .map(|issue| {
            let code = match issue.code {
                _ if server_side => ErrorCode::InternalError,
                "required" => ErrorCode::RequiredFieldMissing,
                "code-invalid" | "not-supported" => ErrorCode::TableValueNotFound,
                "forbidden" | "security" => ErrorCode::UnknownKeyIdentifier,
                "duplicate" | "conflict" => ErrorCode::DuplicateKeyIdentifier,
                _ => ErrorCode::DataType,
            };
            let location = issue
                .expression
                .as_deref()
                .and_then(|pointer| places.find(pointer))
                .cloned();
            Er7Error::new(code, location, issue.details.clone())
        })
        .collect();
    let code = if server_side {
        AckCode::Reject
    } else {
        AckCode::Error
    };
    (code, errors)
}

fn record(code: AckCode) {
    crate::metrics::metrics()
        .hl7_messages
        .get_or_create(&crate::metrics::AckLabel { ack: code.as_str() })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(read_timeout: Duration) -> MllpParts {
        let refuse_all = tower::service_fn(|_: Request<serde_json::Value>| async {
            Err::<http::Response<crate::BoxBody>, crate::BoxError>("no path in this test".into())
        });
        MllpParts {
            path: tower::util::BoxCloneSyncService::new(refuse_all),
            mappings: Arc::new(mappings::Mappings::embedded().unwrap()).into(),
            options: Arc::new(MllpOptions {
                max_frame_bytes: 1024,
                idle_timeout: Duration::from_secs(600),
                read_timeout,
                handshake_timeout: Duration::from_secs(10),
                request_timeout: Duration::from_secs(10),
                max_connections: 1,
                pcd01: Pcd01Settings::default(),
            }),
        }
    }

    /// A plain connection posting as vendor `v`.
    fn plain_sender() -> Sender {
        let vendors = crate::ingress::Vendors::new(
            &[crate::config::VendorSettings {
                name: "v".into(),
                identity: "v".into(),
                models: vec!["CARDIOHELP-i".into()],
                ..Default::default()
            }],
            &[],
            None,
        )
        .unwrap();
        Sender::Plain {
            vendors: vendors.into(),
            name: "v".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_trickling_in_is_cut_off_at_the_read_timeout() {
        let (mut client, server) = tokio::io::duplex(64);
        let parts = parts(Duration::from_secs(30));
        let remote: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let started = tokio::time::Instant::now();
        let connection =
            tokio::spawn(async move { converse(server, remote, plain_sender(), &parts).await });
        client.write_all(b"\x0bMSH").await.unwrap();
        // A byte every 20 s: each read is within the timeout, the frame as a whole is not.
        let mut closed_after = None;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            if client.write_all(b"|").await.is_err() || connection.is_finished() {
                closed_after = Some(started.elapsed());
                break;
            }
        }
        let closed_after = closed_after.expect("the connection is closed");
        assert!(closed_after <= Duration::from_secs(40), "{closed_after:?}");
    }
}
