//! The fuzz smoke run: every fuzz target (`gateway::fuzzing`) replays its seed corpus, a few
//! thousand deterministic mutations of it and every recorded crash. The long runs are
//! `cargo fuzz` in `gateway/fuzz` (README, "Fuzzing"); this keeps the targets building and
//! the crashes they found fixed.

use std::collections::BTreeMap;

use conformance_tests::fuzz_seeds::{corpus_dir, regressions, seeds, write_corpus};
use gateway::fuzzing::{EVENT_SEPARATOR, FILE_SEPARATOR, Target};

/// Mutations per seed: enough to leave every seed's happy path many ways, quick in a debug
/// build.
const MUTATIONS_PER_SEED: usize = 24;

/// One mutation of `data`, in the manner of libFuzzer's: flip, insert, erase or repeat
/// bytes, splice in a piece of another seed, or swap in an interesting token.
fn mutate(rng: &mut fastrand::Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    const TOKENS: &[&[u8]] = &[
        b"null",
        b"-1",
        b"1e308",
        b"-0",
        b"NaN",
        b"\"\"",
        b"[]",
        b"{}",
        b"\xff",
        b"\0",
        b"\"9999-12-31T23:59:59Z\"",
        b"<!DOCTYPE a [<!ENTITY e \"x\">]>",
        b"&e;",
        b"]]>",
        b"18446744073709551616",
        b"\"\\ud800\"",
    ];
    let mut out = data.to_vec();
    for _ in 0..rng.usize(1..4) {
        let at = rng.usize(..=out.len());
        match rng.u8(..6) {
            0 if !out.is_empty() => {
                let i = rng.usize(..out.len());
                out[i] ^= 1 << rng.u8(..8);
            }
            1 => out.insert(at, rng.u8(..)),
            2 if at < out.len() => {
                let end = (at + rng.usize(1..32)).min(out.len());
                out.drain(at..end);
            }
            3 if at < out.len() => {
                let end = (at + rng.usize(1..64)).min(out.len());
                let piece = out[at..end].to_vec();
                out.splice(at..at, piece);
            }
            4 if !other.is_empty() => {
                let from = rng.usize(..other.len());
                let end = (from + rng.usize(1..128)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            _ => {
                let token = TOKENS[rng.usize(..TOKENS.len())];
                let end = (at + rng.usize(0..8)).min(out.len());
                out.splice(at..end, token.iter().copied());
            }
        }
    }
    out
}

#[test]
fn every_fuzz_target_survives_its_seeds_their_mutations_and_past_crashes() {
    let seeds = seeds().expect("the seed corpus renders");
    let mut by_target: BTreeMap<&str, Vec<&[u8]>> = BTreeMap::new();
    for seed in &seeds {
        by_target
            .entry(seed.target.name())
            .or_default()
            .push(&seed.data);
    }
    let mut rng = fastrand::Rng::with_seed(0x0ec0_f022);
    for target in Target::ALL {
        let inputs = by_target.get(target.name()).cloned().unwrap_or_default();
        assert!(!inputs.is_empty(), "{}: no seeds", target.name());
        // The seeds reach what lies behind the parsers: scenario requests are taken (many
        // seeds are the scenarios' refusals, so not all).
        let mut accepted = 0;
        for data in &inputs {
            let statuses = target.run(data);
            accepted += statuses.iter().filter(|s| s.is_success()).count();
        }
        if !matches!(target, Target::MappingTables | Target::Config) {
            assert!(
                accepted > 0,
                "{}: none of {} seeds taken: the harness stops short",
                target.name(),
                inputs.len()
            );
        }
        for (i, data) in inputs.iter().enumerate() {
            let other = inputs[(i + 1) % inputs.len()];
            for _ in 0..MUTATIONS_PER_SEED {
                target.run(&mutate(&mut rng, data, other));
            }
        }
        for (file, data) in regressions(target).expect("the regressions directory reads") {
            eprintln!("replaying {}", file.display());
            target.run(&data);
        }
    }
}

#[test]
fn the_seeds_cover_every_kind_of_input() {
    let seeds = seeds().unwrap();
    let count = |target: Target| seeds.iter().filter(|s| s.target == target).count();
    assert!(count(Target::ObservationsJson) >= 20);
    assert!(count(Target::ObservationsXml) >= 5);
    assert!(count(Target::FhirNative) >= 10);
    assert!(count(Target::RunEvents) >= 5);
    assert!(
        seeds
            .iter()
            .filter(|s| s.target == Target::RunEvents)
            .any(|s| s
                .data
                .windows(EVENT_SEPARATOR.len())
                .any(|w| w == EVENT_SEPARATOR)),
        "run seeds hold whole runs, not single events"
    );
    assert!(
        seeds
            .iter()
            .filter(|s| s.target == Target::MappingTables)
            .all(|s| s
                .data
                .windows(FILE_SEPARATOR.len())
                .any(|w| w == FILE_SEPARATOR))
    );
    assert!(count(Target::Config) >= 1);
    assert!(count(Target::Hl7v2) >= 4);
}

/// Writes the seed corpus for `cargo fuzz` into gateway/fuzz/corpus (README, "Fuzzing").
#[test]
#[ignore = "writes gateway/fuzz/corpus; run it before a fuzzing session"]
fn write_fuzz_seed_corpus() {
    let written = write_corpus(&corpus_dir()).unwrap();
    eprintln!("{written} seeds in {}", corpus_dir().display());
}
