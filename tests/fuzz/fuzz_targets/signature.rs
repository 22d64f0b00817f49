//! Signatures a sender brings (Standard Webhooks, GitHub, bearer, approval links): any
//! header is judged without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparkops_core::webhook;
use sparkops_fuzz::two_parts;

fuzz_target!(|data: &[u8]| {
    let (header, body) = two_parts(data);
    let key = [7u8; 32];
    let _ = webhook::verify(
        &key,
        Some("msg_1"),
        Some("1700000000"),
        Some(&header),
        body.as_bytes(),
        1_700_000_000,
    );
    let _ = webhook::verify_github(&key, Some(&header), body.as_bytes());
    let _ = webhook::verify_bearer("secret-secret-secret", Some(&header));
    let _ = webhook::open_link(&[1u8; 32], &header, 0);
    let _ = webhook::secret_key(&header);
});
