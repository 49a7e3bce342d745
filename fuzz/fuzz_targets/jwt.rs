//! Connection and subscription tokens as the Authenticator verifies them.
//! First byte selects the mode:
//! - even: the rest is the token string as a client sent it;
//! - odd: the rest is the claims JSON, signed here with the node's secret, so
//!   the fuzzer reaches claim parsing behind the signature check.
#![no_main]

use data_encoding::BASE64URL_NOPAD;
use fanfare_core::{AuthConfig, Authenticator};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use std::sync::OnceLock;

const SECRET: &str = "fuzz-secret";

fn auth() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        Authenticator::new(&AuthConfig { hmac_secret: SECRET.into(), ..Default::default() })
            .expect("an HMAC secret is a valid key")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let head = BASE64URL_NOPAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let signed = format!("{head}.{}", BASE64URL_NOPAD.encode(rest));
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key size");
        mac.update(signed.as_bytes());
        format!("{signed}.{}", BASE64URL_NOPAD.encode(&mac.finalize().into_bytes()))
    };
    let _ = auth().verify_connect(&token);
    let _ = auth().verify_subscribe(&token);
});
