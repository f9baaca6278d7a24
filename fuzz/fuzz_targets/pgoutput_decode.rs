//! Feeds arbitrary bytes to the pgoutput decoder, which reads untrusted input from the
//! network: it must return an error or a message, never panic or allocate wildly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = duplex::capture::pgoutput::decode(data) {
        // Formatting the error is part of the contract too.
        let _ = e.to_string();
    }
});
