//! A stand-in for an API server in unit tests: HTTPS on loopback with a
//! certificate for 127.0.0.1 from a CA of its own.

use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The stand-in, answering each request with the next of `statuses` (the
/// last one from then on): its base URL, its CA (PEM) and the request
/// lines it was sent.
pub async fn api_server(statuses: &[u16]) -> (String, String, Arc<Mutex<Vec<String>>>) {
    let mut left = statuses.to_vec();
    api_server_with(move |_| {
        if left.len() > 1 {
            left.remove(0)
        } else {
            left[0]
        }
    })
    .await
}

/// The stand-in, answering each request with the status `answer` gives
/// for it (the request as it is logged, below), for tests whose requests
/// go side by side and so in no fixed order.
pub async fn api_server_with(
    mut answer: impl FnMut(&str) -> u16 + Send + 'static,
) -> (String, String, Arc<Mutex<Vec<String>>>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let end = request
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(request.len(), |p| p + 4);
            let head = String::from_utf8_lossy(&request[..end]).into_owned();
            let header = |name: &str| {
                head.lines().find_map(|l| {
                    let (key, value) = l.split_once(':')?;
                    key.eq_ignore_ascii_case(name)
                        .then(|| value.trim().to_owned())
                })
            };
            let length: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
            let mut body = request[end..].to_vec();
            while body.len() < length {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&buf[..n]),
                }
            }
            // What is logged: the request line, then a bearer token, a body's
            // type and the body, when sent.
            let mut logged = head.lines().next().unwrap_or("").to_owned();
            if let Some(auth) = header("authorization") {
                logged = format!("{logged} authorization: {auth}");
            }
            if length > 0 {
                let kind = header("content-type").unwrap_or_default();
                logged = format!("{logged} {kind} {}", String::from_utf8_lossy(&body));
            }
            let status = answer(&logged);
            log.lock().unwrap().push(logged);
            let body = if status == 200 {
                "ok"
            } else {
                "[+]ping ok\n[-]poststarthook/rbac/bootstrap-roles failed: reason withheld\n\
                 [-]informer-sync failed: reason withheld\nreadyz check failed\n"
            };
            let reply = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(reply.as_bytes()).await;
            let _ = tls.shutdown().await;
        }
    });
    (format!("https://127.0.0.1:{port}"), ca.pem(), asked)
}
