//! HL7 v2 in: IHE PCD-01 (DEV-01) ORU^R01 over MLLP, the installed base of bedside devices and
//! device integration systems.
//!
//! [`mllp`] frames -> [`er7`] reads the message -> [`pcd01`] turns it into the observation batch
//! of the JSON API -> the same observation path (`ingress::stack::observation_path`) ->
//! [`ack`] answers AA only once the readings are durable. [`listener`] runs the connections.

pub mod ack;
pub mod er7;
pub mod listener;
pub mod mllp;
pub mod pcd01;
