//! The fuzz seed corpus, from what the suite already sends: every vendor request of the
//! scenarios (placeholders expanded at a fixed time, so the seeds do not change from run to
//! run), the shipped mapping tables and the documented config. `gateway/fuzz` starts from it;
//! the suite's fuzz smoke run replays it and mutations of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gateway::fuzzing::{EVENT_SEPARATOR, FHIR_NATIVE_VARIANTS, FILE_SEPARATOR, Target};
use time::macros::datetime;

use crate::suite::{ScenarioSource, default_dir};

/// One seed input.
#[derive(Debug, Clone)]
pub struct Seed {
    pub target: Target,
    /// A stable file name: where it came from.
    pub name: String,
    pub data: Vec<u8>,
}

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

/// Where `cargo fuzz` keeps each target's corpus (`gateway/fuzz/corpus/<target>`).
pub fn corpus_dir() -> PathBuf {
    repo_dir().join("gateway/fuzz/corpus")
}

/// Inputs that once broke a target, kept so that they are replayed on every test run
/// (`gateway/fuzz/regressions/<target>`).
pub fn regressions_dir() -> PathBuf {
    repo_dir().join("gateway/fuzz/regressions")
}

/// Every seed, by target.
pub fn seeds() -> Result<Vec<Seed>, gateway::BoxError> {
    let mut seeds = Vec::new();
    // Run events are grouped per run, in the order the scenario sends them.
    let mut runs: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for source in ScenarioSource::load_dir(&default_dir())? {
        let scenario = source.expand("1", datetime!(2026-06-01 12:00 UTC), &BTreeMap::new())?;
        for (i, step) in scenario.steps.iter().enumerate() {
            let request = &step.request;
            if request.method != "POST" || request.repeat.is_some() {
                continue;
            }
            let (body, content_type) = request.body()?;
            let content_type = content_type.unwrap_or("application/json");
            let xml = content_type.contains("xml");
            let name = format!("{}-{i:02}", scenario.name);
            let path = request.path.split('?').next().unwrap_or_default();
            let target = if path == "/v1/observations" {
                Some(if xml {
                    Target::ObservationsXml
                } else {
                    Target::ObservationsJson
                })
            } else if path.starts_with("/v1/fhir/") {
                let variant = FHIR_NATIVE_VARIANTS
                    .iter()
                    .position(|(p, t)| *p == path && (t.contains("xml") == xml));
                if let Some(variant) = variant {
                    let mut data = vec![variant as u8];
                    data.extend_from_slice(&body);
                    seeds.push(Seed {
                        target: Target::FhirNative,
                        name: name.clone(),
                        data,
                    });
                }
                None
            } else if let Some(run) = path
                .strip_prefix("/v1/runs/")
                .and_then(|p| p.strip_suffix("/events"))
            {
                runs.entry(format!("{}-{run}", scenario.name))
                    .or_default()
                    .push(body.to_vec());
                None
            } else {
                None
            };
            if let Some(target) = target {
                seeds.push(Seed {
                    target,
                    name,
                    data: body.to_vec(),
                });
            }
        }
    }
    for (name, events) in runs {
        seeds.push(Seed {
            target: Target::RunEvents,
            name,
            data: events.join(EVENT_SEPARATOR),
        });
    }

    let tables = repo_dir().join("mappings/tables");
    let units = std::fs::read(tables.join("units.toml"))?;
    let mut families = Vec::new();
    for entry in std::fs::read_dir(&tables)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") && !path.ends_with("units.toml") {
            families.push((path.clone(), std::fs::read(&path)?));
        }
    }
    families.sort();
    for (path, family) in &families {
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        seeds.push(Seed {
            target: Target::MappingTables,
            name: format!("units-and-{stem}"),
            data: [units.as_slice(), family].join(FILE_SEPARATOR),
        });
    }
    let mut all = vec![units.as_slice()];
    all.extend(families.iter().map(|(_, f)| f.as_slice()));
    seeds.push(Seed {
        target: Target::MappingTables,
        name: "units-and-every-family".into(),
        data: all.join(FILE_SEPARATOR),
    });

    // HL7 v2: each sample message alone, and all of them framed in one MLLP stream.
    let samples = crate::mllp::sample_messages("20260601120000+0000")?;
    let mut stream = Vec::new();
    for (name, message) in &samples {
        seeds.push(Seed {
            target: Target::Hl7v2,
            name: name.clone(),
            data: message.clone().into_bytes(),
        });
        stream.push(0x0B);
        stream.extend_from_slice(message.as_bytes());
        stream.extend_from_slice(&[0x1C, 0x0D]);
    }
    seeds.push(Seed {
        target: Target::Hl7v2,
        name: "all-samples-framed".into(),
        data: stream,
    });

    let example = std::fs::read_to_string(repo_dir().join("gateway/gateway.example.toml"))?;
    // The example as shipped, and with every commented-out `key = value` line set.
    let uncommented: String = example
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(setting) if setting.contains(" = ") => setting,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    seeds.push(Seed {
        target: Target::Config,
        name: "gateway.example.toml".into(),
        data: example.into_bytes(),
    });
    seeds.push(Seed {
        target: Target::Config,
        name: "gateway.example-every-setting.toml".into(),
        data: uncommented.into_bytes(),
    });
    Ok(seeds)
}

/// The recorded crashes of `target`, as (file, input).
pub fn regressions(target: Target) -> Result<Vec<(PathBuf, Vec<u8>)>, std::io::Error> {
    let dir = regressions_dir().join(target.name());
    let mut found = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                if path.is_file() {
                    found.push((path.clone(), std::fs::read(&path)?));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    found.sort();
    Ok(found)
}

/// Writes the seeds as `cargo fuzz` corpus files, `<dir>/<target>/<name>`.
pub fn write_corpus(dir: &Path) -> Result<usize, gateway::BoxError> {
    let seeds = seeds()?;
    for seed in &seeds {
        let target_dir = dir.join(seed.target.name());
        std::fs::create_dir_all(&target_dir)?;
        std::fs::write(target_dir.join(&seed.name), &seed.data)?;
    }
    Ok(seeds.len())
}
