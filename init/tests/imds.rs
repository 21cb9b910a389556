//! slipway-init's metadata client against the IMDSv2 emulator: the token
//! flow, retries while the service is not up, and clear errors.

#![allow(clippy::unwrap_used)] // helpers shared by tests

use slipway_init::imds::{Imds, ImdsError};
use std::time::{Duration, Instant};
use vm_tests::imds::Imds as Emulator;

const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn reads_identity_and_user_data_with_a_session_token() {
    let emu = Emulator::instance("i-0123456789abcdef0", "us-east-1a", "role = \"node\"\n").unwrap();
    let imds = Imds::new(&emu.endpoint, DEADLINE).unwrap();
    let instance = imds.instance().await.unwrap();
    assert_eq!(instance.id, "i-0123456789abcdef0");
    assert_eq!(instance.availability_zone, "us-east-1a");
    assert_eq!(imds.user_data().await.unwrap(), b"role = \"node\"\n");
}

#[tokio::test]
async fn waits_while_the_service_is_starting() {
    let emu = Emulator::instance("i-0123456789abcdef0", "us-east-1a", "x").unwrap();
    emu.unavailable_for(4);
    let imds = Imds::new(&emu.endpoint, DEADLINE).unwrap();
    assert_eq!(imds.user_data().await.unwrap(), b"x");
    // Four refusals, then a token and a read.
    assert!(emu.requests() >= 6, "{} requests", emu.requests());
}

#[tokio::test]
async fn a_missing_path_is_an_answer_not_a_wait() {
    let emu = Emulator::start([]).unwrap();
    let imds = Imds::new(&emu.endpoint, DEADLINE).unwrap();
    let start = Instant::now();
    let err = imds.user_data().await.unwrap_err();
    assert!(matches!(err, ImdsError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("/latest/user-data"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn an_absent_service_fails_after_the_deadline_naming_it() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let imds = Imds::new(&endpoint, Duration::from_millis(1500)).unwrap();
    let err = imds.user_data().await.unwrap_err();
    let msg = slipway_init::error_chain(&err, ": ");
    assert!(msg.contains(&endpoint), "{msg}");
    assert!(msg.contains("still not ready"), "{msg}");
}
