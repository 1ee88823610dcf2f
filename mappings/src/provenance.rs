//! Provenance of what the gateway writes: which device said it, who sent it (the vendor of the
//! client certificate), which mapping table made it and which gateway build, and for a
//! correction or a retraction, why.
//!
//! One Provenance is written per accepted request, destination and kind of write (created,
//! updated, amended, retracted), naming every resource of that kind as a target. R4 Provenance
//! has no `identifier`, so its idempotency key is a `meta.tag` (system
//! [`PROVENANCE_TAG_SYSTEM`], code `<tracking id>.<kind>`): a conditional create on `_tag`
//! writes it exactly once however often the delivery is retried. Targets are referenced by
//! business identifier, which holds whether or not they travel in the same Bundle.

use serde::Serialize;

use crate::observation_json::Identifier;
use crate::{CANONICAL_BASE, MappedResource, logical_id};

/// `meta.tag` system of the Provenance's idempotency key.
pub const PROVENANCE_TAG_SYSTEM: &str = "https://fhir.ecmo-gateway.org/sid/provenance";
/// Identifier system of the vendors (the configured name of a client certificate).
pub const VENDOR_IDENTIFIER_SYSTEM: &str = "https://fhir.ecmo-gateway.org/sid/vendor";
/// Identifier system of operators (the admin client certificate's identity).
pub const OPERATOR_IDENTIFIER_SYSTEM: &str = "https://fhir.ecmo-gateway.org/sid/operator";
/// Identifier system of gateway builds (`ecmo-gateway/<version>`).
pub const GATEWAY_IDENTIFIER_SYSTEM: &str = "https://fhir.ecmo-gateway.org/sid/gateway";
/// Identifier system of accepted requests: the tracking id the device was given.
pub const TRACKING_ID_SYSTEM: &str = "https://fhir.ecmo-gateway.org/sid/tracking-id";

const PARTICIPANT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/provenance-participant-type";
/// US Core's `transmitter` ("the entity that provided the copy to your system") is the only
/// published code for the party that sent the data, as the vendor's certificate did.
const US_CORE_PARTICIPANT_TYPE: &str =
    "http://hl7.org/fhir/us/core/CodeSystem/us-core-provenance-participant-type";
const DATA_OPERATION: &str = "http://terminology.hl7.org/CodeSystem/v3-DataOperation";

/// The search parameter that finds a resource of `resource_type` by its business key: its
/// `identifier`, or for a Provenance (which has none in R4) its key tag.
pub fn business_key_parameter(resource_type: &str) -> &'static str {
    if resource_type == "Provenance" {
        "_tag"
    } else {
        "identifier"
    }
}

/// A device that produced the resources, as it named itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAgent {
    /// The manufacturer's serial-number identifier system and the serial.
    pub serial_system: String,
    pub serial: String,
    pub model: String,
    pub firmware: Option<String>,
}

/// Who asked for the write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// A device vendor: its configured name and the client certificate identity that matched.
    Vendor { name: String, certificate: String },
    /// An operator, through the admin API, by the admin client certificate's identity.
    Operator { certificate: String },
}

/// What every Provenance of one request shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenanceSource {
    pub sender: Sender,
    pub devices: Vec<DeviceAgent>,
    /// Mapping tables used: family id and [`crate::DeviceFamily::version`].
    pub tables: Vec<(String, String)>,
    /// The gateway build, e.g. `ecmo-gateway/0.1.0`.
    pub gateway: &'static str,
    /// When the gateway received the request (FHIR instant).
    pub received: String,
    /// Why, in the sender's words (a retraction's reason), added to the gateway's own.
    pub reason: Option<String>,
}

/// The kind of write a Provenance records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProvenanceActivity {
    /// First versions.
    Create,
    /// Newer states of resources that change (a run's Procedure, a Device).
    Update,
    /// Corrected readings (`status = amended`).
    Amend,
    /// Retracted readings (`status = entered-in-error`).
    Retract,
}

impl ProvenanceActivity {
    fn key(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Amend => "amend",
            Self::Retract => "retract",
        }
    }

    fn coding(self) -> Coding<'static> {
        let (code, display) = match self {
            Self::Create => ("CREATE", "create"),
            Self::Update | Self::Amend => ("UPDATE", "revise"),
            Self::Retract => ("NULLIFY", "nullify"),
        };
        Coding {
            system: DATA_OPERATION,
            code,
            display,
        }
    }

    /// The gateway's own reason; `None` for writes that need none.
    fn reason(self, sender: &Sender) -> Option<&'static str> {
        match (self, sender) {
            (Self::Amend, _) => {
                Some("corrected by the device: it sent the reading again with a different value")
            }
            (Self::Retract, Sender::Vendor { .. }) => {
                Some("entered in error: taken back by the device")
            }
            (Self::Retract, Sender::Operator { .. }) => {
                Some("entered in error: taken back by an operator of the gateway")
            }
            _ => None,
        }
    }
}

/// A resource a Provenance is about, by business identifier.
#[derive(Debug, Clone, Copy)]
pub struct ProvenanceTarget<'a> {
    pub resource_type: &'a str,
    pub system: &'a str,
    pub value: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Provenance<'a> {
    resource_type: &'static str,
    meta: Meta<'a>,
    target: Vec<Reference<'a>>,
    recorded: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    policy: Vec<String>,
    activity: Concept<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reason: Vec<Concept<'a>>,
    agent: Vec<Agent<'a>>,
    entity: [Entity<'a>; 1],
}

#[derive(Serialize)]
struct Meta<'a> {
    tag: [Coding<'a>; 1],
}

#[derive(Serialize)]
struct Coding<'a> {
    system: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "is_empty")]
    display: &'a str,
}

#[derive(Serialize)]
struct Concept<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    coding: Vec<Coding<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

#[derive(Serialize)]
struct Reference<'a> {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    identifier: Identifier<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<String>,
}

#[derive(Serialize)]
struct Agent<'a> {
    #[serde(rename = "type")]
    kind: Concept<'a>,
    who: Reference<'a>,
}

#[derive(Serialize)]
struct Entity<'a> {
    role: &'static str,
    what: Reference<'a>,
}

fn is_empty(text: &&str) -> bool {
    text.is_empty()
}

fn agent<'a>(system: &'a str, code: &'a str, display: &'a str, who: Reference<'a>) -> Agent<'a> {
    Agent {
        kind: Concept {
            coding: vec![Coding {
                system,
                code,
                display,
            }],
            text: None,
        },
        who,
    }
}

/// The Provenance of one kind of write for one accepted request (`tracking_id`), naming
/// `targets`. Deterministic: the same arguments give the same resource and key.
pub fn provenance(
    source: &ProvenanceSource,
    tracking_id: &str,
    activity: ProvenanceActivity,
    targets: &[ProvenanceTarget<'_>],
) -> MappedResource {
    let key = format!("{tracking_id}.{}", activity.key());
    let mut agents = Vec::with_capacity(source.devices.len() + 2);
    for device in &source.devices {
        let display = match &device.firmware {
            Some(firmware) => format!("{} {}, firmware {firmware}", device.model, device.serial),
            None => format!("{} {}", device.model, device.serial),
        };
        agents.push(agent(
            PARTICIPANT_TYPE,
            "author",
            "Author",
            Reference {
                kind: Some("Device"),
                identifier: Identifier {
                    system: &device.serial_system,
                    value: &device.serial,
                },
                display: Some(display),
            },
        ));
    }
    agents.push(match &source.sender {
        Sender::Vendor { name, certificate } => agent(
            US_CORE_PARTICIPANT_TYPE,
            "transmitter",
            "Transmitter",
            Reference {
                kind: Some("Organization"),
                identifier: Identifier {
                    system: VENDOR_IDENTIFIER_SYSTEM,
                    value: name,
                },
                display: Some(format!("{name} (client certificate {certificate})")),
            },
        ),
        Sender::Operator { certificate } => agent(
            PARTICIPANT_TYPE,
            "enterer",
            "Enterer",
            Reference {
                kind: None,
                identifier: Identifier {
                    system: OPERATOR_IDENTIFIER_SYSTEM,
                    value: certificate,
                },
                display: Some(format!(
                    "gateway operator (admin certificate {certificate})"
                )),
            },
        ),
    });
    agents.push(agent(
        PARTICIPANT_TYPE,
        "assembler",
        "Assembler",
        Reference {
            kind: Some("Device"),
            identifier: Identifier {
                system: GATEWAY_IDENTIFIER_SYSTEM,
                value: source.gateway,
            },
            display: Some(format!("ECMO FHIR gateway {}", source.gateway)),
        },
    ));
    let reason = match (activity.reason(&source.sender), &source.reason) {
        (None, _) => None,
        (Some(ours), None) => Some(ours.to_owned()),
        (Some(ours), Some(theirs)) => Some(format!("{ours}: {theirs}")),
    };
    let resource = Provenance {
        resource_type: "Provenance",
        meta: Meta {
            tag: [Coding {
                system: PROVENANCE_TAG_SYSTEM,
                code: &key,
                display: "",
            }],
        },
        target: targets
            .iter()
            .map(|t| Reference {
                kind: Some(t.resource_type),
                identifier: Identifier {
                    system: t.system,
                    value: t.value,
                },
                display: None,
            })
            .collect(),
        recorded: &source.received,
        policy: source
            .tables
            .iter()
            .map(|(family, version)| format!("{CANONICAL_BASE}/mappings/{family}/{version}"))
            .collect(),
        activity: Concept {
            coding: vec![activity.coding()],
            text: None,
        },
        reason: reason
            .map(|text| Concept {
                coding: Vec::new(),
                text: Some(text),
            })
            .into_iter()
            .collect(),
        agent: agents,
        entity: [Entity {
            role: "source",
            what: Reference {
                kind: None,
                identifier: Identifier {
                    system: TRACKING_ID_SYSTEM,
                    value: tracking_id,
                },
                display: Some("the request the gateway accepted".to_owned()),
            },
        }],
    };
    // Serializing borrowed strings and vectors cannot fail.
    let json = serde_json::to_vec(&resource).unwrap_or_default();
    MappedResource {
        resource_type: "Provenance",
        id: logical_id(PROVENANCE_TAG_SYSTEM, &key),
        identifier_system: PROVENANCE_TAG_SYSTEM.into(),
        identifier_value: key,
        json,
        upsert: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn source(sender: Sender) -> ProvenanceSource {
        ProvenanceSource {
            sender,
            devices: vec![DeviceAgent {
                serial_system: "https://fhir.ecmo-gateway.org/sid/device-serial/getinge".into(),
                serial: "CH-1".into(),
                model: "CARDIOHELP-i".into(),
                firmware: Some("5.1.2".into()),
            }],
            tables: vec![("getinge-cardiohelp".into(), "sha256:0123456789ab".into())],
            gateway: "ecmo-gateway/0.1.0",
            received: "2026-12-03T10:15:00.123Z".into(),
            reason: None,
        }
    }

    fn vendor() -> Sender {
        Sender::Vendor {
            name: "getinge".into(),
            certificate: "cardiohelp.getinge.example".into(),
        }
    }

    const TARGET: ProvenanceTarget<'static> = ProvenanceTarget {
        resource_type: "Observation",
        system: crate::OBSERVATION_IDENTIFIER_SYSTEM,
        value: "getinge-cardiohelp:CH-1:pump-blood-flow:20261203T101500.000Z",
    };

    #[test]
    fn a_provenance_names_device_sender_table_and_gateway_and_is_valid_r4() {
        let built = provenance(
            &source(vendor()),
            "t-1",
            ProvenanceActivity::Create,
            &[TARGET],
        );
        crate::check_resource_json("Provenance", &built.json).unwrap();
        let xml = crate::resource_to_xml(&built.json).unwrap();
        assert!(xml.starts_with(b"<Provenance xmlns=\"http://hl7.org/fhir\">"));
        let value: Value = serde_json::from_slice(&built.json).unwrap();
        assert_eq!(value["target"][0]["identifier"]["value"], TARGET.value);
        assert_eq!(value["activity"]["coding"][0]["code"], "CREATE");
        assert_eq!(value["agent"][0]["who"]["identifier"]["value"], "CH-1");
        assert_eq!(
            value["agent"][0]["who"]["display"],
            "CARDIOHELP-i CH-1, firmware 5.1.2"
        );
        assert_eq!(
            value["agent"][1]["type"]["coding"][0]["code"],
            "transmitter"
        );
        assert_eq!(value["agent"][1]["who"]["identifier"]["value"], "getinge");
        assert_eq!(
            value["agent"][2]["who"]["identifier"]["value"],
            "ecmo-gateway/0.1.0"
        );
        assert_eq!(
            value["policy"][0],
            "https://fhir.ecmo-gateway.org/mappings/getinge-cardiohelp/sha256:0123456789ab"
        );
        assert_eq!(value["entity"][0]["what"]["identifier"]["value"], "t-1");
        assert!(value.get("reason").is_none());
        assert_eq!(value["meta"]["tag"][0]["code"], "t-1.create");
        assert_eq!(built.identifier_value, "t-1.create");
        assert_eq!(business_key_parameter("Provenance"), "_tag");
        assert_eq!(business_key_parameter("Observation"), "identifier");
    }

    #[test]
    fn corrections_and_retractions_carry_their_reason() {
        let amended = provenance(
            &source(vendor()),
            "t-2",
            ProvenanceActivity::Amend,
            &[TARGET],
        );
        let value: Value = serde_json::from_slice(&amended.json).unwrap();
        assert_eq!(value["activity"]["coding"][0]["code"], "UPDATE");
        assert!(
            value["reason"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with("corrected by the device")
        );

        let mut by_operator = source(Sender::Operator {
            certificate: "admin.hospital.example".into(),
        });
        by_operator.devices.clear();
        by_operator.reason = Some("wrong patient".into());
        let retracted = provenance(&by_operator, "t-3", ProvenanceActivity::Retract, &[TARGET]);
        crate::check_resource_json("Provenance", &retracted.json).unwrap();
        let value: Value = serde_json::from_slice(&retracted.json).unwrap();
        assert_eq!(value["activity"]["coding"][0]["code"], "NULLIFY");
        assert_eq!(
            value["reason"][0]["text"],
            "entered in error: taken back by an operator of the gateway: wrong patient"
        );
        assert_eq!(value["agent"][0]["type"]["coding"][0]["code"], "enterer");
        assert_ne!(retracted.id, amended.id);
    }
}
