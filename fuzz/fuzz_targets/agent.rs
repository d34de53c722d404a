//! The `agent` target (docs/fuzzing.md): the first byte picks the endpoint (even: `/v1/take`,
//! odd: `/v1/report`), the rest is the request body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((endpoint, body)) = data.split_first() else {
        return;
    };
    if let Ok(body) = std::str::from_utf8(body) {
        nbt::fuzzing::agent_body(endpoint & 1 == 0, body);
    }
});
