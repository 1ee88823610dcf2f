#![no_main]
//! `cargo fuzz run hl7v2_messages` (README, "Fuzzing"); the target is `gateway::fuzzing::Target`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gateway::fuzzing::Target::Hl7v2.run(data);
});
