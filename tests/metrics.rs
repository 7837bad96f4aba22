//! The worker's own endpoint (`METRICS_ADDR`) scraped during a run on the real RabbitMQ,
//! Redis and Podman: `/ready` once it consumes, `/live`, and `/metrics` whose numbers
//! move with the work (a provision, a teardown, a malformed message).

mod common;

use std::time::Duration;

use common::http::{free_addr, get, until_status};
use common::{TestEnv, id};
use provisioner_events::State;

/// The value of the sample named exactly `sample` (name and labels) in a scrape.
fn sample(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
}

/// Scrapes until `wanted` holds, for up to 30 s.
async fn scrape_until(addr: &str, what: &str, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = get(addr, "/metrics")
            .await
            .map(|(_, t)| t)
            .unwrap_or_default();
        if wanted(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn metrics_live_and_ready_move_with_the_work() {
    let addr = free_addr();
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker_with("observed", &[("METRICS_ADDR", addr.as_str())]);

    assert!(
        until_status(&addr, "/ready", 200, 30).await,
        "never ready: {}",
        env.worker_log("observed")
    );
    assert_eq!(get(&addr, "/live").await.map(|(c, _)| c), Some(200));
    assert_eq!(get(&addr, "/nothing").await.map(|(c, _)| c), Some(404));
    let (code, fresh) = get(&addr, "/metrics").await.expect("a scrape");
    assert_eq!(code, 200);
    assert_eq!(
        sample(&fresh, "provisioner_in_flight{platform=\"docker\"}"),
        Some(0.0),
        "{fresh}"
    );
    assert!(fresh.trim_end().ends_with("# EOF"), "{fresh}");

    let web = env.web("observed-web");
    env.publish(&web).await;
    assert_eq!(events.terminal(&id(&web)).await.state, State::Running);
    env.publish_raw("docker.provision", "garbage", b"{not json")
        .await;
    let text = scrape_until(&addr, "the provision and the dead letter", |text| {
        sample(
            text,
            "provisioner_requests_total{platform=\"docker\",operation=\"provision\",outcome=\"running\",error_class=\"\"}",
        ) == Some(1.0)
            && sample(
                text,
                "provisioner_dead_letters_total{platform=\"docker\",error_class=\"invalid_request\"}",
            ) == Some(1.0)
    })
    .await;
    for (name, at_least) in [
        (
            "provisioner_deliveries_total{platform=\"docker\",settlement=\"ack\"}",
            1.0,
        ),
        (
            "provisioner_deliveries_total{platform=\"docker\",settlement=\"dead_letter\"}",
            1.0,
        ),
        (
            "provisioner_platform_call_duration_seconds_count{platform=\"docker\",operation=\"provision\",outcome=\"ok\"}",
            1.0,
        ),
        (
            "provisioner_requests_total{platform=\"docker\",operation=\"\",outcome=\"rejected\",error_class=\"invalid_request\"}",
            1.0,
        ),
    ] {
        let value = sample(&text, name);
        assert!(
            value.is_some_and(|v| v >= at_least),
            "{name} is {value:?}:\n{text}"
        );
    }
    assert_eq!(
        sample(&text, "provisioner_in_flight{platform=\"docker\"}"),
        Some(0.0)
    );

    let down = env.teardown("observed-down", &id(&web));
    env.publish(&down).await;
    assert_eq!(events.terminal(&id(&down)).await.state, State::Stopped);
    scrape_until(&addr, "the teardown", |text| {
        sample(
            text,
            "provisioner_requests_total{platform=\"docker\",operation=\"teardown\",outcome=\"stopped\",error_class=\"\"}",
        ) == Some(1.0)
    })
    .await;
}

/// `PROVISIONER_LOG_FORMAT=json`: every line a JSON object, and the lines of a delivery
/// carry its platform, request id and attempt.
#[tokio::test]
async fn json_logs_carry_the_request_on_every_line_of_its_delivery() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker_with("json", &[("PROVISIONER_LOG_FORMAT", "json")]);
    let web = env.web("json-web");
    env.publish(&web).await;
    assert_eq!(events.terminal(&id(&web)).await.state, State::Running);
    // The "done" line is written before the terminal event goes out.
    let log = env.worker_log("json");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let of_request: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["span"]["request.id"] == id(&web).as_str())
        .collect();
    assert!(!of_request.is_empty(), "no line of the request:\n{log}");
    assert!(
        of_request
            .iter()
            .any(|l| l["message"] == "done" && l["span"]["attempt"] == 1),
        "no `done` line with its attempt:\n{log}"
    );
    for line in of_request {
        assert_eq!(line["span"]["platform"], "docker", "{line}");
        assert!(
            line["level"].is_string() && line["timestamp"].is_string(),
            "{line}"
        );
    }
}
