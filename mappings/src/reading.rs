use crate::datetime::{TimeError, TimeWindow};
use crate::table::DeviceFamily;

/// The device a batch of readings comes from, with what every reading of the batch shares.
#[derive(Debug, Clone, Copy)]
pub struct DeviceContext<'a> {
    pub family: &'a DeviceFamily,
    pub serial: &'a str,
    pub model: &'a str,
    pub patient: Option<PatientRef<'a>>,
    /// The device times taken, around when the gateway received the batch.
    pub window: TimeWindow,
}

/// A patient named by a business identifier (the EHR resolves it; the gateway never needs the
/// patient's logical id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatientRef<'a> {
    pub system: &'a str,
    pub value: &'a str,
}

/// A reading's value as it arrived: a JSON number kept as its text, so that no precision is lost
/// on the way to the FHIR decimal, or a boolean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadingValue<'a> {
    Number(&'a str),
    Boolean(bool),
    /// A waveform: samples every `period` milliseconds (a JSON number's text) from the
    /// reading's time; a sample is a JSON number, or null for one the device marked invalid.
    Samples {
        period: &'a str,
        data: &'a [serde_json::Value],
    },
}

/// Device status flags of one reading, as a bit set (no allocation per reading).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadingFlags(u8);

impl ReadingFlags {
    pub const INVALID: Self = Self(1);
    pub const QUESTIONABLE: Self = Self(1 << 1);
    pub const CALIBRATING: Self = Self(1 << 2);
    pub const IN_ALARM: Self = Self(1 << 3);
    pub const ALARMS_INHIBITED: Self = Self(1 << 4);
    pub const TEST_DATA: Self = Self(1 << 5);

    /// The flag of a name in the ingest schema's `flags` enum.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "invalid" => Self::INVALID,
            "questionable" => Self::QUESTIONABLE,
            "calibrating" => Self::CALIBRATING,
            "in-alarm" => Self::IN_ALARM,
            "alarms-inhibited" => Self::ALARMS_INHIBITED,
            "test-data" => Self::TEST_DATA,
            _ => return None,
        })
    }

    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// Both sets of flags.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// One reading of a batch, borrowed from the parsed payload.
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    pub parameter: &'a str,
    pub value: ReadingValue<'a>,
    pub unit: Option<&'a str>,
    pub time: &'a str,
    pub flags: ReadingFlags,
    /// The ECMO run the reading falls in, when the gateway knows one: its patient becomes the
    /// subject and its Procedure the Observation's `partOf`.
    pub run: Option<RunLink<'a>>,
}

/// A reading's run: the run id and the run's patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLink<'a> {
    pub run_id: &'a str,
    pub patient: PatientRef<'a>,
}

/// Which field of a reading an error is about; the gateway turns it into a JSON pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadingField {
    Parameter,
    Value,
    Unit,
    Time,
    Samples,
}

impl ReadingField {
    pub fn name(self) -> &'static str {
        match self {
            Self::Parameter => "parameter",
            Self::Value => "value",
            Self::Unit => "unit",
            Self::Time => "time",
            Self::Samples => "samples",
        }
    }
}

/// Why a reading cannot become an Observation. Each message is written for the vendor's
/// developer: it says what was sent and what would have been accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadingError {
    #[error("parameter '{parameter}' is not defined for {family}; known parameters: {known}")]
    UnknownParameter {
        parameter: String,
        family: String,
        known: String,
    },
    #[error("parameter '{parameter}' needs a unit; accepted: {accepted}")]
    MissingUnit { parameter: String, accepted: String },
    #[error("unit '{unit}' is not accepted for parameter '{parameter}'; accepted: {accepted}")]
    UnitNotAccepted {
        unit: String,
        parameter: String,
        accepted: String,
    },
    #[error("parameter '{parameter}' takes a number, not true or false")]
    NotANumber { parameter: String },
    #[error("parameter '{parameter}' takes true or false (or 1 or 0), not {value}")]
    NotABoolean { parameter: String, value: String },
    #[error(
        "value {value} {unit} is outside the plausible range {low} to {high} {ucum} for parameter '{parameter}'"
    )]
    OutOfRange {
        parameter: String,
        value: String,
        unit: String,
        low: f64,
        high: f64,
        ucum: String,
    },
    #[error(
        "value {value} is the device's marker for an invalid '{parameter}' reading: a FHIR Observation says so with dataAbsentReason, not a value"
    )]
    InvalidMarker { parameter: String, value: String },
    #[error(
        "sample {index} of the waveform, {value} {unit}, is outside the plausible range {low} to {high} {ucum} for parameter '{parameter}'"
    )]
    SampleOutOfRange {
        parameter: String,
        index: usize,
        value: String,
        unit: String,
        low: f64,
        high: f64,
        ucum: String,
    },
    #[error(
        "parameter '{parameter}' takes true or false: it has no waveform, send single readings"
    )]
    NotAWaveform { parameter: String },
    #[error(
        "a waveform as FHIR SampledData is taken with one dimension, a numeric origin with its unit code, an optional factor, decimal or E samples, and no limits (lowerLimit, upperLimit, L, U: they are in the device's terms)"
    )]
    NativeWaveform,
    #[error("time {0}")]
    Time(#[from] TimeError),
    #[error("internal error while building the resource: {0}")]
    Build(String),
}

impl ReadingError {
    pub fn field(&self) -> ReadingField {
        match self {
            Self::UnknownParameter { .. } => ReadingField::Parameter,
            Self::MissingUnit { .. } | Self::UnitNotAccepted { .. } => ReadingField::Unit,
            Self::NotANumber { .. }
            | Self::NotABoolean { .. }
            | Self::OutOfRange { .. }
            | Self::InvalidMarker { .. }
            | Self::Build(_) => ReadingField::Value,
            Self::Time(_) => ReadingField::Time,
            Self::SampleOutOfRange { .. } | Self::NotAWaveform { .. } | Self::NativeWaveform => {
                ReadingField::Samples
            }
        }
    }

    /// The FHIR issue-type code (http://hl7.org/fhir/issue-type) that fits.
    pub fn issue_code(&self) -> &'static str {
        match self {
            Self::UnknownParameter { .. } | Self::UnitNotAccepted { .. } => "code-invalid",
            Self::MissingUnit { .. } => "required",
            Self::NativeWaveform => "not-supported",
            Self::Build(_) => "exception",
            _ => "value",
        }
    }
}
