//! How every AWS SDK configuration in the project is loaded: the builder's,
//! slipway-init's and the tests'. The SDK is compiled without an HTTPS
//! client of its own; this one is hyper 1 on rustls with ring, the crypto
//! provider the certificates (rcgen) and the other HTTP clients already
//! use, so the binaries carry one TLS stack and one crypto library.

use aws_config::{BehaviorVersion, ConfigLoader};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

/// The SDK's standard loader (region, credentials chain, `AWS_ENDPOINT_URL`)
/// with the project's HTTPS client. Everything it loads, the credential
/// providers included, makes its requests through that client.
pub fn config_loader() -> ConfigLoader {
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    aws_config::defaults(BehaviorVersion::latest()).http_client(https)
}
