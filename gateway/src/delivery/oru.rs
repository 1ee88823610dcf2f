//! HL7 v2 out: Observations as ORU^R01 (IHE PCD-01 layout) over MLLP with mutual TLS, for EHRs
//! that take device data only as inbound v2.
//!
//! One message per Observation, its control id (MSH-10) the hash of the Observation's business
//! identifier and content: a resend after a lost ACK is the same message with the same id, which
//! receivers drop as a duplicate, while a corrected value is a new message (OBX-11 `C`) and a
//! retraction one with OBX-11 `W`. The ACK decides: AA/CA delivered; AE/CE refused (the content,
//! dead-lettered by the worker's policy); AR/CR, no ACK or a broken connection: sent again
//! later; a TLS failure: the configuration.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use http::StatusCode;
use mappings::MappedResource;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::{Decoder, Encoder};

use crate::config::{DestinationSettings, OruSettings};
use crate::delivery::DeliveryError;
use crate::delivery::response::EntryOutcome;
use crate::hl7v2::er7::{self, Delimiters, Message};
use crate::hl7v2::mllp::MllpCodec;

/// The largest ACK read.
const MAX_ACK_BYTES: usize = 64 * 1024;

/// Connections kept open for the next messages, at most.
const IDLE_CONNECTIONS: usize = 4;

/// Sends ORU^R01 messages to one receiver.
pub struct OruSender {
    destination: String,
    host: String,
    port: u16,
    connector: TlsConnector,
    timeout: Duration,
    header: OruSettings,
    idle: Mutex<Vec<TlsStream<TcpStream>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum OruConfigError {
    #[error("destination '{0}': base_url must be mllps://host:port")]
    Address(String),
    #[error("destination '{0}': {1}")]
    Tls(String, crate::tls::TlsError),
}

impl OruSender {
    pub fn new(settings: &DestinationSettings) -> Result<Self, OruConfigError> {
        let (host, port) = mllps_address(&settings.base_url)
            .ok_or_else(|| OruConfigError::Address(settings.name.clone()))?;
        let identity = settings
            .client_cert
            .as_deref()
            .zip(settings.client_key.as_deref());
        let tls = crate::tls::client_config(&settings.ca, identity)
            .map_err(|e| OruConfigError::Tls(settings.name.clone(), e))?;
        Ok(Self {
            destination: settings.name.clone(),
            host,
            port,
            connector: TlsConnector::from(Arc::new(tls)),
            timeout: settings.timeout,
            header: settings.hl7v2.clone(),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends one Observation and reads its ACK.
    pub async fn send(&self, resource: &MappedResource) -> Result<EntryOutcome, DeliveryError> {
        let observation: Value = serde_json::from_slice(&resource.json)
            .map_err(|e| self.refused(format!("the Observation is not JSON: {e}"), None))?;
        let control_id = control_id(resource);
        let message = encode(
            &observation,
            &control_id,
            &self.header,
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|why| self.refused(why, None))?;
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(self.timeout, self.exchange(message.as_bytes())).await;
        let metrics = crate::metrics::metrics();
        metrics
            .delivery_seconds
            .get_or_create(&crate::metrics::DestinationLabel {
                destination: self.destination.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        let ack = match answer {
            Ok(Ok(ack)) => ack,
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(self.unavailable("no ACK in time".into())),
        };
        self.judge(&ack, &control_id)
    }

    /// Writes `message` on an open connection (or a new one) and reads the answer.
    async fn exchange(&self, message: &[u8]) -> Result<Vec<u8>, DeliveryError> {
        let mut out = BytesMut::with_capacity(message.len() + 3);
        MllpCodec::new(MAX_ACK_BYTES)
            .encode(message, &mut out)
            .map_err(|e| self.unavailable(e.to_string()))?;
        // A kept connection the receiver has closed since fails before any answer: the message
        // goes again on a new one (the same control id, so at most once at the receiver).
        let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(stream) = reused {
            match self.over(stream, &out).await {
                Err(Exchange::NoAnswer(_)) => {}
                Err(Exchange::Failed(error)) => return Err(error),
                Ok(frame) => return Ok(frame),
            }
        }
        match self.over(self.connect().await?, &out).await {
            Ok(frame) => Ok(frame),
            Err(Exchange::NoAnswer(error) | Exchange::Failed(error)) => Err(error),
        }
    }

    /// Writes the framed message on `stream` and reads one answer frame; a stream that ends
    /// cleanly is kept for the next message.
    async fn over(
        &self,
        mut stream: TlsStream<TcpStream>,
        framed: &[u8],
    ) -> Result<Vec<u8>, Exchange> {
        let io = |e: std::io::Error| self.unavailable(format!("MLLP connection: {e}"));
        let mut codec = MllpCodec::new(MAX_ACK_BYTES);
        stream
            .write_all(framed)
            .await
            .map_err(|e| Exchange::NoAnswer(io(e)))?;
        stream
            .flush()
            .await
            .map_err(|e| Exchange::NoAnswer(io(e)))?;
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                    if idle.len() < IDLE_CONNECTIONS && buf.is_empty() {
                        idle.push(stream);
                    }
                    return Ok(frame.to_vec());
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(Exchange::Failed(
                        self.unavailable(format!("the answer is not an ACK: {e}")),
                    ));
                }
            }
            let read = stream.read_buf(&mut buf).await;
            match read {
                Ok(0) | Err(_) if buf.is_empty() => {
                    return Err(Exchange::NoAnswer(self.unavailable(
                        "the receiver closed the connection without an ACK".into(),
                    )));
                }
                Ok(0) => {
                    return Err(Exchange::Failed(self.unavailable(
                        "the receiver closed the connection in the middle of its ACK".into(),
                    )));
                }
                Err(e) => return Err(Exchange::Failed(io(e))),
                Ok(_) => {}
            }
        }
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>, DeliveryError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.unavailable(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
            DeliveryError::Misconfigured {
                destination: self.destination.clone(),
                reason: format!("host name: {e}"),
            }
        })?;
        self.connector.connect(name, tcp).await.map_err(|e| {
            match crate::delivery::retry::configuration_failure(&e) {
                Some(reason) => DeliveryError::Misconfigured {
                    destination: self.destination.clone(),
                    reason,
                },
                None => self.unavailable(format!("TLS: {e}")),
            }
        })
    }

    /// What an ACK says about the message `control_id`.
    fn judge(&self, ack: &[u8], control_id: &str) -> Result<EntryOutcome, DeliveryError> {
        let (text, delimiters, _) = er7::decode(ack)
            .map_err(|e| self.unavailable(format!("the ACK is not readable: {e}")))?;
        let message = Message::parse(&text, delimiters)
            .map_err(|e| self.unavailable(format!("the ACK is not readable: {e}")))?;
        let Some(msa) = message.first("MSA") else {
            return Err(self.unavailable("the answer has no MSA segment".into()));
        };
        if msa.field(2) != control_id {
            return Err(self.unavailable(format!(
                "the ACK is for message '{}', not this one",
                msa.field(2)
            )));
        }
        let errors = ack_errors(&message, delimiters);
        match msa.field(1) {
            "AA" | "CA" => Ok(EntryOutcome {
                status: format!("{} {control_id}", msa.field(1)),
                location: None,
            }),
            code @ ("AE" | "CE") => Err(self.refused(
                format!("the receiver answered {code}"),
                Some(json!({"ack": code, "controlId": control_id, "errors": errors})),
            )),
            code @ ("AR" | "CR") => Err(self.unavailable(format!(
                "the receiver answered {code}: {}",
                errors
                    .iter()
                    .filter_map(|e| e["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ))),
            other => Err(self.unavailable(format!("MSA-1 '{other}' is no acknowledgment code"))),
        }
    }

    fn unavailable(&self, reason: String) -> DeliveryError {
        DeliveryError::Unavailable {
            destination: self.destination.clone(),
            reason,
            retry_after: None,
        }
    }

    fn refused(&self, why: String, outcome: Option<Value>) -> DeliveryError {
        DeliveryError::Rejected {
            destination: self.destination.clone(),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            outcome: Some(outcome.unwrap_or_else(|| json!({"reason": why}))),
        }
    }
}

/// How one exchange on one connection failed: before any answer came (a kept connection the
/// receiver had closed: worth one more try on a new one), or otherwise.
enum Exchange {
    NoAnswer(DeliveryError),
    Failed(DeliveryError),
}

/// `mllps://host:port` -> (host, port).
pub fn mllps_address(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("mllps://")?.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok().filter(|&p| p > 0)?;
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// The control id of the message carrying `resource`: the same content, the same id.
pub fn control_id(resource: &MappedResource) -> String {
    let mut hash = Sha256::new();
    hash.update(resource.identifier_value.as_bytes());
    hash.update([0]);
    hash.update(&resource.json);
    let digest = hash.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("ECMO-{hex}")
}

/// The ERR segments of an ACK, as JSON for the message's record.
fn ack_errors(message: &Message<'_>, d: Delimiters) -> Vec<Value> {
    message
        .segments()
        .iter()
        .filter(|s| s.id == "ERR")
        .map(|err| {
            json!({
                "location": err.field(2),
                "code": er7::component(err.field(3), 1, d),
                "severity": err.field(4),
                "text": er7::unescape(err.field(8), d).unwrap_or_default(),
            })
        })
        .collect()
}

/// An Observation as ORU^R01 (PCD-01 layout): MSH, PID from the subject's identifier, OBR
/// and one OBX.
pub fn encode(
    observation: &Value,
    control_id: &str,
    header: &OruSettings,
    now: time::OffsetDateTime,
) -> Result<String, String> {
    let d = Delimiters::default();
    let esc = |text: &str| {
        let mut out = String::with_capacity(text.len());
        er7::escape_into(&mut out, text, d);
        out
    };
    // A charted interval's statistic covers a period: OBR-7 and OBR-8 say it, OBX-14 its start.
    let (when, until) = match (
        observation["effectiveDateTime"].as_str(),
        observation["effectivePeriod"]["start"].as_str(),
        observation["effectivePeriod"]["end"].as_str(),
    ) {
        (Some(at), _, _) => (dtm_of(at)?, String::new()),
        (None, Some(start), Some(end)) => (dtm_of(start)?, dtm_of(end)?),
        _ => return Err("the Observation has no effectiveDateTime or effectivePeriod".into()),
    };
    let mut text = format!(
        "MSH|^~\\&|{}|{}|{}|{}|{}||ORU^R01^ORU_R01|{}|P|2.6|||AL|NE||UNICODE UTF-8|||IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO\r",
        esc(&header.sending_application),
        esc(&header.sending_facility),
        esc(&header.receiving_application),
        esc(&header.receiving_facility),
        er7::dtm(now),
        esc(control_id),
    );
    let subject = &observation["subject"]["identifier"];
    match (subject["system"].as_str(), subject["value"].as_str()) {
        (Some(system), Some(value)) => {
            let authority = match system.strip_prefix("urn:oid:") {
                Some(oid) => format!("&{}&ISO", esc(oid)),
                None => format!("&{}&URI", esc(system)),
            };
            text.push_str(&format!("PID|||{}^^^{authority}^MR\r", esc(value)));
        }
        _ => text.push_str("PID|||\r"),
    }
    text.push_str(&format!(
        "OBR|1||{}|182777000^monitoring of patient^SCT|||{when}|{until}\r",
        esc(control_id)
    ));
    let codings: Vec<(&str, &str, &str)> = observation["code"]["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                c["system"].as_str()?,
                c["code"].as_str()?,
                c["display"].as_str().unwrap_or_default(),
            ))
        })
        .collect();
    let v2_system = |system: &str| match system {
        "urn:iso:std:iso:11073:10101" => "MDC",
        "http://loinc.org" => "LN",
        "http://snomed.info/sct" => "SCT",
        _ => "99ECMO",
    };
    let ours = codings
        .iter()
        .find(|(s, _, _)| v2_system(s) == "99ECMO")
        .ok_or("the Observation has no code of the gateway's CodeSystem")?;
    let primary = ["MDC", "LN"]
        .iter()
        .find_map(|want| codings.iter().find(|(s, _, _)| v2_system(s) == *want))
        .unwrap_or(ours);
    let mut identifier = format!(
        "{}^{}^{}",
        esc(primary.1),
        esc(primary.2),
        v2_system(primary.0)
    );
    if primary != ours {
        identifier.push_str(&format!("^{}^{}^99ECMO", esc(ours.1), esc(ours.2)));
    }
    let status = match observation["status"].as_str() {
        Some("final") => "F",
        Some("amended" | "corrected") => "C",
        Some("entered-in-error") => "W",
        Some("preliminary") => "P",
        other => {
            return Err(format!(
                "Observation status {other:?} has no HL7 v2 result status"
            ));
        }
    };
    let mut value_type = "NM";
    let (value, unit, status) = if let Some(quantity) = observation.get("valueQuantity") {
        let value = quantity["value"].to_string();
        if !value
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
        {
            return Err(format!("value {value} is not an HL7 NM number"));
        }
        let ucum = quantity["code"].as_str().unwrap_or_default();
        (value, format!("{}^{}^UCUM", esc(ucum), esc(ucum)), status)
    } else if let Some(waveform) = observation.get("valueSampledData") {
        value_type = "NA";
        let (samples, unit) = waveform_of(waveform)?;
        (samples, format!("{}^{}^UCUM", esc(unit), esc(unit)), status)
    } else if let Some(flag) = observation["valueBoolean"].as_bool() {
        value_type = "CWE";
        let yes_no = if flag {
            "Y^Yes^HL70136"
        } else {
            "N^No^HL70136"
        };
        (yes_no.to_owned(), String::new(), status)
    } else if status == "W" {
        (String::new(), String::new(), status)
    } else {
        (String::new(), String::new(), "X")
    };
    // OBX-18 names the device: the serial of the DeviceMetric the Observation points at.
    let device = mappings::serial_of_metric(
        observation["device"]["identifier"]["value"]
            .as_str()
            .unwrap_or_default(),
    );
    // OBX-17: measured by the device; a charted statistic says which one after it.
    let mut method = "AMEAS^auto-measurement^MDC".to_owned();
    if let Some(statistic) = observation["method"]["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["system"] == mappings::OBSERVATION_STATISTICS)
    {
        method.push_str(&format!(
            "~{}^{}^99STAT",
            esc(statistic["code"].as_str().unwrap_or_default()),
            esc(statistic["display"].as_str().unwrap_or_default())
        ));
    }
    text.push_str(&format!(
        "OBX|1|{value_type}|{identifier}|1.1.1.1|{value}|{unit}|||||{status}|||{when}|||{method}|{}\r",
        esc(device)
    ));
    // A waveform's sample period follows it, as the IHE PCD Waveform Content Module places it:
    // MDC_ATTR_TIME_PD_SAMP under the waveform's sub-id, in milliseconds.
    if let Some(period) = observation["valueSampledData"].get("period") {
        text.push_str(&format!(
            "OBX|2|NM|{}|1.1.1.1.1|{period}|{}|||||{status}|||{when}\r",
            sample_period_code(),
            milliseconds_unit()
        ));
    }
    Ok(text)
}

/// OBX-3 of a waveform's sample period (MDC_ATTR_TIME_PD_SAMP, as PCD-01 in reads it).
pub fn sample_period_code() -> String {
    let (code, name) = crate::hl7v2::pcd01::SAMPLE_PERIOD;
    format!("{code}^{name}^MDC")
}

/// OBX-6 of a sample period: MDC_DIM_MILLI_SEC, with its UCUM code as the alternate.
pub fn milliseconds_unit() -> String {
    let (code, name) = crate::hl7v2::pcd01::MILLISECONDS;
    format!("{code}^{name}^MDC^ms^ms^UCUM")
}

/// A SampledData's samples as an HL7 NA value (components, an invalid sample empty) and its
/// UCUM unit. Only what the gateway writes is taken: origin 0, no factor, one dimension.
fn waveform_of(waveform: &Value) -> Result<(String, &str), String> {
    let origin = &waveform["origin"];
    let unit = origin["code"]
        .as_str()
        .ok_or("the waveform's origin has no unit")?;
    if origin["value"].as_f64() != Some(0.0)
        || waveform.get("factor").is_some()
        || waveform["dimensions"].as_u64() != Some(1)
    {
        return Err("a waveform with an origin other than 0, a factor or several dimensions has no HL7 NA form here".into());
    }
    let data = waveform["data"]
        .as_str()
        .ok_or("the waveform has no data")?;
    let mut samples = String::with_capacity(data.len());
    for (i, sample) in data.split(' ').enumerate() {
        if i > 0 {
            samples.push('^');
        }
        match sample {
            "E" => {}
            number
                if !number.is_empty()
                    && number
                        .bytes()
                        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-') =>
            {
                samples.push_str(number)
            }
            other => return Err(format!("waveform sample '{other}' is not an HL7 NM number")),
        }
    }
    Ok((samples, unit))
}

/// RFC 3339 (as FHIR writes it) -> HL7 DTM with offset.
fn dtm_of(rfc3339: &str) -> Result<String, String> {
    let at = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("effectiveDateTime '{rfc3339}': {e}"))?;
    let fraction = rfc3339
        .split_once('.')
        .map(|(_, rest)| {
            rest.bytes()
                .take_while(u8::is_ascii_digit)
                .take(4)
                .map(char::from)
                .collect::<String>()
        })
        .unwrap_or_default();
    let mut text = er7::dtm(at);
    if !fraction.is_empty() {
        text.insert_str(14, &format!(".{fraction}"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [
                {"system": "https://fhir.ecmo-gateway.org/CodeSystem/ecmo", "code": "drainage-blood-saturation", "display": "Drainage blood O2 saturation"},
                {"system": "urn:iso:std:iso:11073:10101", "code": "150332", "display": "MDC_SAT_O2_VEN"}
            ]},
            "subject": {"identifier": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN^7"}},
            "effectiveDateTime": "2026-12-06T10:14:55.250+01:00",
            "valueQuantity": {"value": 71.5, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
            "device": {"type": "DeviceMetric", "identifier": {"value": "CH-1:drainage-blood-saturation"}}
        })
    }

    #[test]
    fn an_observation_becomes_a_pcd01_message_that_reads_back() {
        let text = encode(
            &observation(),
            "ECMO-1",
            &OruSettings::default(),
            time::macros::datetime!(2026-12-06 10:15:00 +01:00),
        )
        .unwrap();
        let (text, d, _) = er7::decode(text.as_bytes()).unwrap();
        let message = Message::parse(&text, d).unwrap();
        let msh = message.first("MSH").unwrap();
        assert_eq!(msh.field(9), "ORU^R01^ORU_R01");
        assert_eq!(msh.field(10), "ECMO-1");
        let pid = message.first("PID").unwrap();
        assert_eq!(pid.field(3), "MRN\\S\\7^^^&1.2.36.146.595.217.0.1&ISO^MR");
        let obx = message.first("OBX").unwrap();
        assert_eq!(
            obx.field(3),
            "150332^MDC_SAT_O2_VEN^MDC^drainage-blood-saturation^Drainage blood O2 saturation^99ECMO"
        );
        assert_eq!(obx.field(5), "71.5");
        assert_eq!(obx.field(6), "%^%^UCUM");
        assert_eq!(obx.field(11), "F");
        assert_eq!(obx.field(14), "20261206101455.250+0100");
        assert_eq!(obx.field(18), "CH-1");
    }

    #[test]
    fn statuses_and_absent_values() {
        let at = time::macros::datetime!(2026-12-06 10:15:00 UTC);
        let mut absent = observation();
        absent.as_object_mut().unwrap().remove("valueQuantity");
        let text = encode(&absent, "X", &OruSettings::default(), at).unwrap();
        assert!(text.contains("|1.1.1.1|||||||X|||"), "{text}");
        let mut retracted = observation();
        retracted["status"] = json!("entered-in-error");
        assert!(
            encode(&retracted, "X", &OruSettings::default(), at)
                .unwrap()
                .contains("|||||W|||")
        );
        let mut bubble = observation();
        bubble.as_object_mut().unwrap().remove("valueQuantity");
        bubble["valueBoolean"] = json!(false);
        assert!(
            encode(&bubble, "X", &OruSettings::default(), at)
                .unwrap()
                .contains("OBX|1|CWE|150332^MDC_SAT_O2_VEN^MDC^drainage-blood-saturation^Drainage blood O2 saturation^99ECMO|1.1.1.1|N^No^HL70136||||||F|")
        );
        let mut amended = observation();
        amended["status"] = json!("amended");
        assert!(
            encode(&amended, "X", &OruSettings::default(), at)
                .unwrap()
                .contains("|||||C|||")
        );
    }

    /// `observation` as the message text a receiver reads (control id X).
    fn read_back(observation: &Value) -> String {
        let text = encode(
            observation,
            "X",
            &OruSettings::default(),
            time::macros::datetime!(2026-12-06 10:20:00 UTC),
        )
        .unwrap();
        er7::decode(text.as_bytes()).unwrap().0.into_owned()
    }

    #[test]
    fn a_charted_interval_says_its_period_and_statistic() {
        let mut mean = observation();
        let o = mean.as_object_mut().unwrap();
        o.remove("effectiveDateTime");
        o.insert(
            "effectivePeriod".into(),
            json!({"start": "2026-12-06T10:00:00Z", "end": "2026-12-06T10:15:00Z"}),
        );
        o.insert(
            "method".into(),
            json!({"coding": [{"system": mappings::OBSERVATION_STATISTICS, "code": "average", "display": "Average"}]}),
        );
        o.insert("status".into(), json!("amended"));
        let text = read_back(&mean);
        let message = Message::parse(&text, Delimiters::default()).unwrap();
        let obr = message.first("OBR").unwrap();
        assert_eq!(obr.field(7), "20261206100000+0000");
        assert_eq!(obr.field(8), "20261206101500+0000");
        let obx = message.first("OBX").unwrap();
        assert_eq!(obx.field(14), "20261206100000+0000");
        assert_eq!(
            obx.field(17),
            "AMEAS^auto-measurement^MDC~average^Average^99STAT"
        );
        // Changed after it was sent as final: a correction.
        assert_eq!(obx.field(11), "C");
        // A point in time leaves OBR-8 empty.
        let single = read_back(&observation());
        let single = Message::parse(&single, Delimiters::default()).unwrap();
        assert_eq!(single.first("OBR").unwrap().field(8), "");
        assert_eq!(
            single.first("OBX").unwrap().field(17),
            "AMEAS^auto-measurement^MDC"
        );
    }

    #[test]
    fn a_waveform_is_an_na_value_followed_by_its_sample_period() {
        let mut waveform = observation();
        let o = waveform.as_object_mut().unwrap();
        o.remove("valueQuantity");
        o.insert(
            "valueSampledData".into(),
            json!({"origin": {"value": 0, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
                   "period": 8, "dimensions": 1, "data": "-32.5 -31 E -30.25"}),
        );
        let text = read_back(&waveform);
        let message = Message::parse(&text, Delimiters::default()).unwrap();
        let obx: Vec<_> = message
            .segments()
            .iter()
            .filter(|s| s.id == "OBX")
            .collect();
        assert_eq!(obx.len(), 2);
        assert_eq!(obx[0].field(2), "NA");
        assert_eq!(obx[0].field(5), "-32.5^-31^^-30.25");
        assert_eq!(obx[0].field(6), "mm[Hg]^mm[Hg]^UCUM");
        assert_eq!(obx[0].field(4), "1.1.1.1");
        assert_eq!(obx[1].field(3), sample_period_code());
        assert_eq!(obx[1].field(4), "1.1.1.1.1");
        assert_eq!(obx[1].field(5), "8");
        assert_eq!(obx[1].field(6), milliseconds_unit());
        // What the gateway never writes is refused rather than sent wrong.
        for (key, value) in [
            ("factor", json!(2)),
            ("dimensions", json!(2)),
            ("data", json!("1 L 2")),
        ] {
            let mut odd = waveform.clone();
            odd["valueSampledData"][key] = value;
            assert!(
                encode(
                    &odd,
                    "X",
                    &OruSettings::default(),
                    time::OffsetDateTime::UNIX_EPOCH
                )
                .is_err(),
                "{key}"
            );
        }
    }

    #[test]
    fn mllps_addresses() {
        assert_eq!(
            mllps_address("mllps://ehr.example:2575"),
            Some(("ehr.example".into(), 2575))
        );
        assert_eq!(
            mllps_address("mllps://127.0.0.1:1/"),
            Some(("127.0.0.1".into(), 1))
        );
        for bad in [
            "https://ehr:1",
            "mllps://ehr",
            "mllps://:2575",
            "mllps://ehr:0",
            "mllps://ehr:x",
        ] {
            assert_eq!(mllps_address(bad), None, "{bad}");
        }
    }
}
