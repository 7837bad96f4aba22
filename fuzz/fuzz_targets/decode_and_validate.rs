//! Any bytes as a request message: decoding and validation must answer (a request or a
//! clear error), never panic, and a decoded request must survive every step a worker
//! takes before its platform call: its spec read and checked as each platform's, its
//! payload hash, its routing key, and a round trip through JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provisioner_events::spec::validate_spec;
use provisioner_events::{PlatformName, decode_request};

fuzz_target!(|body: &[u8]| {
    let Ok(request) = decode_request(body) else {
        return;
    };
    let _ = request.payload_hash();
    let _ = request.routing_key();
    let _ = request.target();
    if let Some(spec) = &request.spec {
        // Every platform's reading, not only the one named: a spec is hostile input to all.
        for platform in PlatformName::ALL {
            let _ = validate_spec(platform, spec);
        }
    }
    let again = serde_json::to_vec(&request).expect("a decoded request serializes");
    let back = decode_request(&again).expect("a decoded request decodes again");
    assert_eq!(back.payload_hash(), request.payload_hash());
});
