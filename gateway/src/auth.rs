//! Device authentication at Hello: a per-device token provisioned with `gateway devices add`
//! (stored hashed), or a fleet token derived from the fleet secret, or nothing at all with
//! `auth.mode = "none"`. A revoked device is refused whatever it presents, in either mode.

use sqlx::SqlitePool;

use crate::config::AuthMode;
use crate::store::{devices, StoreError};

/// Why a Hello was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown device or wrong token.
    #[error("unknown device or wrong token")]
    Failed,
    /// The device was revoked by an operator.
    #[error("device is revoked")]
    Revoked,
    /// A new device past `limits.max_devices` (the message says so).
    #[error("{0}")]
    Limit(String),
    /// The store could not be asked.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks Hello credentials against the store and the fleet secret.
pub struct Authenticator {
    mode: AuthMode,
    /// `None` when fleet tokens are off.
    fleet_secret: Option<Vec<u8>>,
    pool: SqlitePool,
}

impl Authenticator {
    /// An authenticator reading credentials from `pool`.
    pub fn new(mode: AuthMode, fleet_secret: Option<Vec<u8>>, pool: SqlitePool) -> Self {
        Self {
            mode,
            fleet_secret,
            pool,
        }
    }

    /// Whether `token` proves `device_id`. A device seen for the first time is recorded
    /// once `admit` lets it in (`limits.max_devices`).
    pub async fn check(
        &self,
        device_id: &str,
        token: &str,
        admit: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), AuthError> {
        let creds = devices::credentials(&self.pool, device_id).await?;
        // An operator's revocation holds whatever the auth mode.
        if creds.as_ref().is_some_and(|c| c.revoked_at_ms.is_some()) {
            return Err(AuthError::Revoked);
        }
        if self.mode == AuthMode::Token {
            let provisioned = creds.as_ref().is_some_and(|c| {
                c.token_hash.as_deref() == Some(devices::hash_token(token).as_str())
            });
            let fleet = || {
                self.fleet_secret.as_ref().is_some_and(|secret| {
                    proto::token::verify_fleet_token(secret, device_id, token)
                })
            };
            if !provisioned && !fleet() {
                return Err(AuthError::Failed);
            }
        }
        if creds.is_none() {
            admit().map_err(AuthError::Limit)?;
            devices::ensure(&self.pool, device_id).await?;
        }
        Ok(())
    }
}
