//! The `canonical` target (docs/fuzzing.md): bytes read as JSON, then canonically encoded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbt::fuzzing::canonical(data);
});
