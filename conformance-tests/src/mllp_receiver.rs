//! A reference HL7 v2 receiver: what an EHR's inbound ORU^R01 interface does, over MLLP with
//! mutual TLS on 127.0.0.1. It keeps each message once by control id (MSH-10), answers AA, and
//! can be told to answer AE or AR, or to break the connection, for the next messages.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use gateway::BoxError;
use gateway::hl7v2::ack::{self, AckCode, Severity};
use gateway::hl7v2::er7::{self, Er7Error, ErrorCode, Message};
use gateway::hl7v2::mllp::MllpCodec;
use gateway::hl7v2::pcd01::Header;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::codec::{Decoder, Encoder};

/// What the receiver does with the next message instead of taking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverFault {
    /// `AR`: the receiver cannot take it now.
    Reject,
    /// `AE`: the receiver refuses its content.
    Error,
    /// Keeps the message, then closes the connection before the ACK (the ACK is lost).
    LoseAck,
    /// Closes the connection without keeping the message.
    Drop,
    /// Keeps the message and answers AA, then closes the connection (as interfaces that close
    /// idle connections do).
    CloseAfterAck,
}

/// One kept message, read.
#[derive(Debug, Clone)]
pub struct ReceivedResult {
    pub control_id: String,
    /// PID-3 as sent.
    pub patient: String,
    /// OBX-2, OBX-3, OBX-5, OBX-6, OBX-11, OBX-14, OBX-17 and OBX-18 of its first OBX.
    pub value_type: String,
    pub code: String,
    pub value: String,
    pub unit: String,
    pub status: String,
    pub time: String,
    pub method: String,
    pub device: String,
    /// OBR-7 and OBR-8: the interval a statistic covers (OBR-8 empty for a point in time).
    pub observed_from: String,
    pub observed_until: String,
    /// A waveform's sample period (the value and unit of its MDC_ATTR_TIME_PD_SAMP OBX).
    pub sample_period: Option<(String, String)>,
}

#[derive(Default)]
struct State {
    kept: Vec<ReceivedResult>,
    seen: HashSet<String>,
    duplicates: usize,
    faults: VecDeque<ReceiverFault>,
}

#[derive(Clone, Default)]
pub struct ReferenceReceiver {
    state: Arc<Mutex<State>>,
}

/// A receiver listening; stops when dropped.
pub struct RunningReceiver {
    pub receiver: ReferenceReceiver,
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl RunningReceiver {
    /// The destination's `base_url` (the test certificate names `localhost`).
    pub fn url(&self) -> String {
        format!("mllps://localhost:{}", self.addr.port())
    }
}

impl ReferenceReceiver {
    pub async fn start(tls: Arc<rustls::ServerConfig>) -> Result<RunningReceiver, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let receiver = Self::default();
        let (stop, mut stopped) = oneshot::channel();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let serving = receiver.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let acceptor = acceptor.clone();
                let receiver = serving.clone();
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        receiver.converse(stream).await;
                    }
                });
            }
        });
        Ok(RunningReceiver {
            receiver,
            addr,
            _stop: stop,
        })
    }

    /// The next `count` messages meet `fault`.
    pub fn fail_next(&self, fault: ReceiverFault, count: usize) {
        let mut state = self.lock();
        state.faults.extend(std::iter::repeat_n(fault, count));
    }

    /// Every message kept, once each, in arrival order.
    pub fn results(&self) -> Vec<ReceivedResult> {
        self.lock().kept.clone()
    }

    /// Messages that arrived again with a control id already kept.
    pub fn duplicates(&self) -> usize {
        self.lock().duplicates
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn converse<S>(&self, mut stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut codec = MllpCodec::new(4 * 1024 * 1024);
        let mut buf = BytesMut::new();
        loop {
            let frame = match codec.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                },
                Err(_) => return,
            };
            let (answer, close_after) = self.answer(&frame);
            let Some(answer) = answer else {
                return;
            };
            let mut out = BytesMut::new();
            if codec.encode(&answer, &mut out).is_err()
                || stream.write_all(&out).await.is_err()
                || stream.flush().await.is_err()
                || close_after
            {
                let _ = stream.shutdown().await;
                return;
            }
        }
    }

    /// The ACK of one message (None: close the connection instead), and whether to close the
    /// connection after it.
    fn answer(&self, frame: &[u8]) -> (Option<Vec<u8>>, bool) {
        let close_after = self.lock().faults.front() == Some(&ReceiverFault::CloseAfterAck);
        (self.answer_one(frame), close_after)
    }

    fn answer_one(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let (text, delimiters, charset) = er7::decode(frame).ok()?;
        let message = Message::parse(&text, delimiters).ok()?;
        let header = Header::read(&message, charset);
        let now = time::OffsetDateTime::now_utc();
        let mut state = self.lock();
        let ack_id = format!("R{}", state.kept.len() + state.duplicates + 1);
        let fault = state.faults.pop_front();
        let refusal = |code, text: &str| {
            let problem = Er7Error::new(ErrorCode::InternalError, None, text);
            ack::write(&header, code, &[(Severity::Error, &problem)], &ack_id, now)
        };
        match fault {
            Some(ReceiverFault::Reject) => return Some(refusal(AckCode::Reject, "busy")),
            Some(ReceiverFault::Error) => {
                return Some(refusal(AckCode::Error, "this result cannot be filed"));
            }
            Some(ReceiverFault::Drop) => return None,
            Some(ReceiverFault::LoseAck | ReceiverFault::CloseAfterAck) | None => {}
        }
        if state.seen.insert(header.control_id.clone()) {
            let obx = message.first("OBX");
            let field = |n: usize| obx.map(|s| s.field(n)).unwrap_or_default().to_owned();
            let obr = |n: usize| {
                message
                    .first("OBR")
                    .map(|s| s.field(n))
                    .unwrap_or_default()
                    .to_owned()
            };
            let sample_period = message
                .segments()
                .iter()
                .filter(|s| s.id == "OBX")
                .find(|s| s.field(3).starts_with("67980^"))
                .map(|s| (s.field(5).to_owned(), s.field(6).to_owned()));
            state.kept.push(ReceivedResult {
                control_id: header.control_id.clone(),
                patient: message
                    .first("PID")
                    .map(|p| p.field(3))
                    .unwrap_or_default()
                    .to_owned(),
                value_type: field(2),
                code: field(3),
                value: field(5),
                unit: field(6),
                status: field(11),
                time: field(14),
                method: field(17),
                device: field(18),
                observed_from: obr(7),
                observed_until: obr(8),
                sample_period,
            });
        } else {
            state.duplicates += 1;
        }
        if fault == Some(ReceiverFault::LoseAck) {
            return None;
        }
        Some(ack::write(&header, AckCode::Accept, &[], &ack_id, now))
    }
}
