//! Everything a peer controls in a data-path request header. Parsing never panics, and an
//! accepted request stays inside one extent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model::EXTENT_SIZE_BYTES;
use volume::wire::{ActiveRange, Request, ResponseHeader, REQUEST_HEADER_BYTES, RESPONSE_HEADER_BYTES};

fuzz_target!(|input: &[u8]| {
    if let Some(bytes) = input.get(..REQUEST_HEADER_BYTES) {
        if let Ok(request) = Request::parse(bytes.try_into().unwrap()) {
            assert!(u64::from(request.offset_bytes) + u64::from(request.len_bytes) <= EXTENT_SIZE_BYTES);
            assert_eq!(Request::parse(&request.encode()), Ok(request));
        }
    }
    if let Some(bytes) = input.get(..RESPONSE_HEADER_BYTES) {
        let _ = ResponseHeader::parse(bytes.try_into().unwrap());
    }
    // A `ListActive` reply: every range it yields stays inside one extent.
    if let Ok(ranges) = ActiveRange::parse_all(input) {
        for range in ranges {
            assert!(u64::from(range.offset_bytes) + u64::from(range.len_bytes) <= EXTENT_SIZE_BYTES);
        }
    }
});
