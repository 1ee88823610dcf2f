#![no_main]
//! `cargo fuzz run observations_json` (README, "Fuzzing"); the target is `gateway::fuzzing::Target`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gateway::fuzzing::Target::ObservationsJson.run(data);
});
