//! The fault-injecting proxy against a real moto: its throttling and
//! server errors parse in the AWS SDK as the real services' would, SDK
//! retries get through a 50% fault rate of every kind with nothing lost,
//! delays delay, and the metadata emulator's late start and flakiness.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

use aws_config::retry::RetryConfig;
use aws_config::{Region, SdkConfig};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use vm_tests::faults::{FaultProxy, Kind, Plan};
use vm_tests::imds::Imds;
use vm_tests::moto::Moto;

const REGION: &str = "us-east-1";

/// SDK configuration for `endpoint`, retrying up to `attempts` times with
/// short backoffs so a test with many faults stays quick.
async fn sdk(endpoint: &str, attempts: u32) -> SdkConfig {
    vm_tests::moto::fake_credentials();
    slipway_init::sdk::config_loader()
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(attempts)
                .with_initial_backoff(Duration::from_millis(10))
                .with_max_backoff(Duration::from_millis(200)),
        )
        .load()
        .await
}

fn s3(conf: &SdkConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(conf)
            .force_path_style(true)
            .build(),
    )
}

/// The error code the SDK parsed out of a failed call.
fn code<E: ProvideErrorMetadata, R>(
    result: Result<impl std::fmt::Debug, SdkError<E, R>>,
) -> String {
    let err = result.expect_err("the call should fail");
    err.as_service_error()
        .and_then(|e| e.code())
        .unwrap_or("no service error")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_errors_parse_as_the_real_services_errors() {
    let moto = Moto::start().unwrap();
    let proxy = FaultProxy::start(
        &moto.endpoint,
        Plan::always("ec2", "DescribeVolumes", Kind::Throttle)
            .and_always("s3", "GetObject")
            .and_always("cloudformation", "DescribeStacks")
            .and_always("autoscaling", "DescribeAutoScalingGroups"),
    )
    .unwrap();
    let conf = sdk(&proxy.endpoint, 1).await;
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let s3 = s3(&conf);
    let cfn = aws_sdk_cloudformation::Client::new(&conf);
    let asg = aws_sdk_autoscaling::Client::new(&conf);

    // Without the proxy these would succeed, or fail with NoSuchBucket and
    // ValidationError: moto never sees them.
    let describe_volumes = || ec2.describe_volumes().send();
    let get_object = || s3.get_object().bucket("none").key("k").send();
    let describe_stacks = || cfn.describe_stacks().stack_name("missing").send();
    let describe_groups = || asg.describe_auto_scaling_groups().send();
    assert_eq!(code(describe_volumes().await), "RequestLimitExceeded");
    assert_eq!(code(get_object().await), "SlowDown");
    assert_eq!(code(describe_stacks().await), "Throttling");
    assert_eq!(code(describe_groups().await), "Throttling");
    // Other calls pass through to moto.
    ec2.describe_instances().send().await.unwrap();
    s3.list_buckets().send().await.unwrap();

    let plan = |kind| {
        Plan::always("ec2", "DescribeVolumes", kind)
            .and_always("s3", "GetObject")
            .and_always("cloudformation", "DescribeStacks")
    };
    proxy.set_plan(plan(Kind::ServerError));
    assert_eq!(code(describe_volumes().await), "InternalError");
    assert_eq!(code(get_object().await), "InternalError");
    assert_eq!(code(describe_stacks().await), "InternalFailure");

    proxy.set_plan(plan(Kind::Reset));
    let reset = describe_volumes().await.expect_err("a reset connection");
    let io_failure = match &reset {
        SdkError::DispatchFailure(d) => d.as_connector_error().is_some_and(|c| c.is_io()),
        _ => false,
    };
    assert!(
        io_failure,
        "a reset is an I/O failure, no answer: {reset:?}"
    );

    println!("{}", proxy.summary());
    let volumes = proxy.count("ec2", "DescribeVolumes");
    assert_eq!(
        (volumes.seen, volumes.forwarded, volumes.throttled),
        (3, 0, 1)
    );
    assert_eq!((volumes.server_errors, volumes.resets), (1, 1));
    assert_eq!(proxy.count("ec2", "DescribeInstances").forwarded, 1);
    assert_eq!(proxy.count("s3", "ListBuckets").forwarded, 1);
    let stacks = proxy
        .requests()
        .into_iter()
        .find(|r| r.action == "DescribeStacks")
        .unwrap();
    assert_eq!(stacks.service, "cloudformation");
    assert_eq!(stacks.params["StackName"], "missing");
    assert_eq!(stacks.fault, Some(Kind::Throttle));
    let object = proxy
        .requests()
        .into_iter()
        .find(|r| r.action == "GetObject")
        .unwrap();
    assert_eq!(
        (
            object.params["Bucket"].as_str(),
            object.params["Key"].as_str()
        ),
        ("none", "k")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_get_through_half_the_requests_failing() {
    let moto = Moto::start().unwrap();
    let proxy = FaultProxy::start(
        &moto.endpoint,
        Plan::random(0.5, 7, [Kind::Throttle, Kind::ServerError, Kind::Reset]),
    )
    .unwrap();
    let conf = sdk(&proxy.endpoint, 10).await;
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let s3 = s3(&conf);

    for _ in 0..20 {
        ec2.describe_volumes().send().await.unwrap();
    }
    s3.create_bucket().bucket("faults").send().await.unwrap();
    for i in 0..20 {
        let body = format!("object {i}");
        s3.put_object()
            .bucket("faults")
            .key(format!("k/{i}"))
            .body(body.clone().into_bytes().into())
            .send()
            .await
            .unwrap();
        let got = s3
            .get_object()
            .bucket("faults")
            .key(format!("k/{i}"))
            .send()
            .await
            .unwrap();
        let got = got.body.collect().await.unwrap().into_bytes();
        assert_eq!(got, body.as_bytes());
    }

    println!("{}", proxy.summary());
    // Each call reached moto exactly once: failed attempts never did.
    for (service, action) in [
        ("ec2", "DescribeVolumes"),
        ("s3", "PutObject"),
        ("s3", "GetObject"),
    ] {
        let c = proxy.count(service, action);
        assert_eq!(c.forwarded, 20, "{service} {action}: {c}");
        assert_eq!(c.seen, c.forwarded + c.failed(), "{service} {action}: {c}");
        assert!(c.failed() > 0, "{service} {action}: {c}");
    }
    let volumes = proxy.count("ec2", "DescribeVolumes");
    assert!(
        volumes.throttled > 0 && volumes.server_errors > 0 && volumes.resets > 0,
        "every kind of fault on DescribeVolumes: {volumes}"
    );
    let total = proxy.total();
    assert!(
        total.throttled > 0 && total.server_errors > 0 && total.resets > 0,
        "{total}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_calls_succeed_late() {
    let moto = Moto::start().unwrap();
    let delay = Duration::from_millis(300);
    let proxy =
        FaultProxy::start(&moto.endpoint, Plan::random(1.0, 1, [Kind::Delay(delay)])).unwrap();
    let conf = sdk(&proxy.endpoint, 1).await;
    let ec2 = aws_sdk_ec2::Client::new(&conf);

    let start = Instant::now();
    ec2.describe_volumes().send().await.unwrap();
    let took = start.elapsed();
    assert!(took >= delay, "took {took:?}");
    let c = proxy.count("ec2", "DescribeVolumes");
    assert_eq!((c.seen, c.delayed, c.forwarded), (1, 1, 1), "{c}");

    proxy.set_plan(Plan::passthrough());
    let start = Instant::now();
    ec2.describe_volumes().send().await.unwrap();
    let c = proxy.count("ec2", "DescribeVolumes");
    assert_eq!((c.seen, c.delayed, c.forwarded), (2, 1, 2), "{c}");
    println!("undelayed call took {:?}", start.elapsed());
}

/// The status line of a GET to the emulator with a valid session token.
fn imds_status(imds: &Imds) -> String {
    let addr = imds.endpoint.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: {addr}\r\nX-aws-ec2-metadata-token: {}\r\n\r\n",
        vm_tests::imds::TOKEN
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn imds_comes_up_late_and_flakes() {
    let imds = Imds::instance("i-0123", "us-east-1a", "").unwrap();
    imds.unavailable_until(Instant::now() + Duration::from_millis(300));
    assert!(imds_status(&imds).contains(" 503 "));
    std::thread::sleep(Duration::from_millis(350));
    assert!(imds_status(&imds).contains(" 200 "));

    imds.server_errors(0.5, 3);
    let statuses: Vec<String> = (0..40).map(|_| imds_status(&imds)).collect();
    let errors = statuses.iter().filter(|s| s.contains(" 500 ")).count();
    let ok = statuses.iter().filter(|s| s.contains(" 200 ")).count();
    assert_eq!(errors + ok, 40, "{statuses:?}");
    assert!((5..35).contains(&errors), "{errors} of 40 failed");
}
