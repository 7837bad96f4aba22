//! Any JSON object as a spec, read and checked as every platform's: never a panic, only
//! a spec or a clear error. (The envelope target rarely reaches here: a spec sits behind
//! a valid request.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use provisioner_events::PlatformName;
use provisioner_events::spec::validate_spec;

fuzz_target!(|body: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
    else {
        return;
    };
    for platform in PlatformName::ALL {
        let _ = validate_spec(platform, &spec);
    }
});
