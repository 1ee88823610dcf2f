#![no_main]
//! `cargo fuzz run run_events` (README, "Fuzzing"); the target is `gateway::fuzzing::Target`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gateway::fuzzing::Target::RunEvents.run(data);
});
