//! Fleet tokens: a device's token is the lowercase hex HMAC-SHA256(fleet_secret, device_id),
//! so a factory can provision thousands of devices from one secret with no per-device step.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn mac(fleet_secret: &[u8], device_id: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(fleet_secret).unwrap_or_else(|_| unreachable!());
    mac.update(device_id.as_bytes());
    mac
}

/// The token a device named `device_id` presents under `fleet_secret`.
pub fn fleet_token(fleet_secret: &[u8], device_id: &str) -> String {
    hex::encode(mac(fleet_secret, device_id).finalize().into_bytes())
}

/// Whether `token` is the fleet token of `device_id`, compared in constant time.
pub fn verify_fleet_token(fleet_secret: &[u8], device_id: &str, token: &str) -> bool {
    let Ok(raw) = hex::decode(token) else {
        return false;
    };
    // Only the lowercase form is canonical; reject other spellings of the same bytes.
    if token.bytes().any(|b| b.is_ascii_uppercase()) {
        return false;
    }
    mac(fleet_secret, device_id).verify_slice(&raw).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_token_matches_the_rfc_4231_hmac_sha256_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            fleet_token(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verify_accepts_only_the_right_lowercase_token() {
        let token = fleet_token(b"secret", "meter-1");
        assert!(verify_fleet_token(b"secret", "meter-1", &token));
        assert!(!verify_fleet_token(b"secret", "meter-2", &token));
        assert!(!verify_fleet_token(b"other", "meter-1", &token));
        assert!(!verify_fleet_token(
            b"secret",
            "meter-1",
            &token.to_uppercase()
        ));
        assert!(!verify_fleet_token(b"secret", "meter-1", "not hex"));
        assert!(!verify_fleet_token(b"secret", "meter-1", ""));
    }
}
