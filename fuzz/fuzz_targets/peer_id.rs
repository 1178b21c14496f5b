//! `PeerId::from_str` on arbitrary (UTF-8) text: no panic; whatever parses prints back as the
//! trimmed lowercase input.
#![no_main]

use burrow::wire::PeerId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(id) = text.parse::<PeerId>() {
        assert_eq!(id.to_string(), text.trim().to_ascii_lowercase());
        assert!(id.is_valid_key());
    }
});
