//! The `schedule` target (docs/fuzzing.md): UTF-8 input to `nbt::fuzzing::schedule`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        nbt::fuzzing::schedule(text);
    }
});
