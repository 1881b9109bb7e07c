//! `delta-registry tls self-signed`: a certificate the registry can serve and clients can
//! trust with `--ca-cert`, without a CA.
//!
//! TLS (rustls, as every modern stack) refuses a server certificate marked as a CA
//! (`basicConstraints CA:TRUE`), which is what a bare `openssl req -x509` makes; this one
//! is an end-entity certificate, self-signed, naming the hosts clients connect to.

/// A self-signed end-entity certificate for `names` (DNS names or IP addresses) and its
/// private key, both PEM.
pub fn self_signed(names: &[String]) -> crate::Result<(String, String)> {
    if names.is_empty() {
        return Err(crate::Error::InvalidArgument(
            "a certificate needs at least one name (--name localhost)".into(),
        ));
    }
    let key = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| crate::Error::InvalidArgument(format!("making the certificate: {e}")))?;
    Ok((key.cert.pem(), key.signing_key.serialize_pem()))
}
