#![no_main]
//! `cargo fuzz run fhir_native` (README, "Fuzzing"); the target is `gateway::fuzzing::Target`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gateway::fuzzing::Target::FhirNative.run(data);
});
