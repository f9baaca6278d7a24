//! Feeds arbitrary bytes to the change-event envelope parser, which reads whatever is
//! on a change topic (not only what duplex wrote): it must return an error or an
//! event, never panic; and an event it accepts must encode and parse back to itself,
//! so that a dead letter or a re-published event carries exactly what was read.
#![no_main]

use duplex::event::ChangeEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match ChangeEvent::from_json(data) {
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(event) => {
            let _ = event.position();
            let again = ChangeEvent::from_json(&event.to_json())
                .expect("an accepted event must parse back after encoding");
            assert_eq!(again.to_json(), event.to_json(), "encoding is not stable");
        }
    }
});
