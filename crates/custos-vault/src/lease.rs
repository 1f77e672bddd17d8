//! Vault's lease endpoints (`sys/leases/renew` and `sys/leases/revoke`), which vaultrs does
//! not wrap, described for its request machinery so that they share its client, token,
//! namespace and error handling.

use rustify_derive::Endpoint;
use serde::Deserialize;

/// `PUT sys/leases/renew`: extends a lease by `increment` seconds from now, as far as the
/// lease's maximum allows.
#[derive(Debug, Endpoint)]
#[endpoint(path = "sys/leases/renew", method = "PUT", response = "LeaseAnswer")]
pub struct RenewLeaseRequest {
    pub lease_id: String,
    pub increment: u64,
}

/// `PUT sys/leases/revoke`: ends a lease now; Vault revokes the credential behind it.
#[derive(Debug, Endpoint)]
#[endpoint(path = "sys/leases/revoke", method = "PUT")]
pub struct RevokeLeaseRequest {
    pub lease_id: String,
}

/// Vault's answer to a renewal: the lifetime it granted.
#[derive(Debug, Deserialize)]
pub struct LeaseAnswer {
    pub lease_id: String,
    pub lease_duration: u64,
    pub renewable: bool,
}
