#![no_main]
//! `cargo fuzz run mapping_tables` (README, "Fuzzing"); the target is `gateway::fuzzing::Target`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gateway::fuzzing::Target::MappingTables.run(data);
});
