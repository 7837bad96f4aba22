//! The worker's own endpoint (`METRICS_ADDR`) scraped during a run on the real RabbitMQ,
//! Redis and Podman: `/ready` once it consumes, `/live`, and `/metrics` whose numbers
//! move with the work (a provision, a teardown, a malformed message).

mod common;

use std::time::Duration;

use common::http::{Collector, free_addr, get, until_status};
use common::{TestEnv, id};
use provisioner_core::Broker;
use provisioner_events::{State, StatusEvent};

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
        (
            "provisioner_health_wait_duration_seconds_count{platform=\"docker\",outcome=\"ready\"}",
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
    // The health wait is part of the provision's platform call, never longer.
    let waited = sample(
        &text,
        "provisioner_health_wait_duration_seconds_sum{platform=\"docker\",outcome=\"ready\"}",
    )
    .expect("a health wait");
    let called = sample(
        &text,
        "provisioner_platform_call_duration_seconds_sum{platform=\"docker\",operation=\"provision\",outcome=\"ok\"}",
    )
    .expect("a platform call");
    assert!(
        waited > 0.0 && waited <= called,
        "health wait {waited} s, call {called} s"
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
/// carry its platform, request id, attempt and trace id, in the innermost span or an
/// enclosing one.
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
    let delivery_of = |line: &serde_json::Value| {
        line["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|span| span["name"] == "delivery")
            .cloned()
    };
    let of_request: Vec<(&serde_json::Value, serde_json::Value)> = lines
        .iter()
        .filter_map(|l| Some((l, delivery_of(l)?)))
        .filter(|(_, delivery)| delivery["request.id"] == id(&web).as_str())
        .collect();
    assert!(!of_request.is_empty(), "no line of the request:\n{log}");
    assert!(
        of_request
            .iter()
            .any(|(l, delivery)| l["message"] == "done" && delivery["attempt"] == 1),
        "no `done` line with its attempt:\n{log}"
    );
    let trace_id = of_request[0].1["trace_id"].as_str().unwrap_or_default();
    assert!(is_hex(trace_id, 32), "no trace id: {}", of_request[0].0);
    for (line, delivery) in &of_request {
        assert_eq!(delivery["platform"], "docker", "{line}");
        assert_eq!(delivery["trace_id"], trace_id, "{line}");
        assert!(
            line["level"].is_string() && line["timestamp"].is_string(),
            "{line}"
        );
    }
}

fn is_hex(text: &str, digits: usize) -> bool {
    text.len() == digits && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The trace id of a `traceparent` header (`00-<trace id>-<parent span id>-<flags>`).
fn trace_of(traceparent: &str) -> Option<(&str, &str)> {
    let mut parts = traceparent.split('-');
    let (version, trace, parent) = (parts.next()?, parts.next()?, parts.next()?);
    (version == "00" && is_hex(trace, 32) && is_hex(parent, 16)).then_some((trace, parent))
}

/// Every status event the journal kept, with its `traceparent` header.
async fn journal_with_traces(env: &TestEnv) -> Vec<(Option<String>, StatusEvent)> {
    env.take_all("provisioning.status.journal")
        .await
        .into_iter()
        .filter_map(|(headers, body)| {
            let traceparent = match headers.inner().get("traceparent") {
                Some(lapin::types::AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            };
            Some((traceparent, serde_json::from_slice(&body).ok()?))
        })
        .collect()
}

/// A request published with a W3C `traceparent` by a producer of its own, and one sent by
/// `provisioner submit`: the worker's spans join each request's trace (exported by OTLP
/// to the test's collector), and every status event of the request names the trace.
#[tokio::test]
async fn one_trace_runs_from_the_producer_through_the_worker_to_every_status_event() {
    let collector = Collector::start().await;
    let endpoint = format!("http://{}", collector.addr);
    let otlp = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker_with("traced", &otlp);

    // A producer of its own, following the W3C convention for AMQP headers.
    let producer_trace = uuid::Uuid::new_v4().simple().to_string();
    let producer_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let web = env.web("traced-web");
    env.broker
        .declare(provisioner_events::PlatformName::Docker)
        .await
        .expect("declare");
    {
        use lapin::options::BasicPublishOptions;
        use lapin::types::{AMQPValue, FieldTable};
        let (_connection, channel) = env.raw_channel().await;
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(format!("00-{producer_trace}-{producer_span}-01").into()),
        );
        channel
            .basic_publish(
                "provisioning.requests".into(),
                "docker.provision".into(),
                BasicPublishOptions::default(),
                web.to_string().as_bytes(),
                lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await
            .expect("publish")
            .await
            .expect("published");
    }
    assert_eq!(events.terminal(&id(&web)).await.state, State::Running);

    // `provisioner submit`, exporting its own span to the same collector.
    let down = env.teardown("traced-down", &id(&web));
    let file = std::env::temp_dir().join(format!("traced-down-{}.json", env.run_id));
    std::fs::write(&file, down.to_string()).expect("write the request");
    let submitted = std::process::Command::new(common::BIN)
        .args(["submit", "--wait", file.to_str().expect("a path")])
        .envs(env.env())
        .envs(otlp)
        .output()
        .expect("run submit");
    let _ = std::fs::remove_file(&file);
    let said = String::from_utf8_lossy(&submitted.stderr).into_owned();
    assert!(submitted.status.success(), "{said}");
    let submit_trace = said
        .split("trace ")
        .nth(1)
        .map(|rest| rest.chars().take(32).collect::<String>())
        .unwrap_or_default();
    assert!(is_hex(&submit_trace, 32), "submit named no trace: {said}");

    // Every status event of each request carries its trace.
    let journal = journal_with_traces(&env).await;
    for (request, trace) in [(id(&web), &producer_trace), (id(&down), &submit_trace)] {
        let of_request: Vec<_> = journal
            .iter()
            .filter(|(_, event)| event.request_id == request)
            .collect();
        assert!(
            of_request.iter().any(|(_, e)| e.ends_request()),
            "no terminal event of {request} in {journal:?}"
        );
        for (traceparent, event) in of_request {
            let named = traceparent.as_deref().and_then(trace_of).map(|(t, _)| t);
            assert_eq!(named, Some(trace.as_str()), "{event:?}");
        }
    }

    // The collector has each trace: the producer's (or submit's) span, the delivery as
    // its child, and the platform call inside the delivery.
    let named = |spans: &[serde_json::Value], name: &str| -> Vec<serde_json::Value> {
        spans
            .iter()
            .filter(|s| s["name"] == name)
            .cloned()
            .collect()
    };
    let chained = |spans: &[serde_json::Value], root: &str| {
        named(spans, "delivery").iter().any(|delivery| {
            delivery["parentSpanId"] == root
                && named(spans, "platform_call")
                    .iter()
                    .any(|call| call["parentSpanId"] == delivery["spanId"])
        })
    };
    let producers = collector
        .trace_until(&producer_trace, |spans| chained(spans, producer_span))
        .await;
    assert!(
        chained(&producers, producer_span),
        "the producer's trace lacks the delivery or its platform call: {producers:#?}\n{}",
        env.worker_log("traced")
    );
    let submits = collector
        .trace_until(&submit_trace, |spans| {
            named(spans, "submit")
                .first()
                .is_some_and(|submit| chained(spans, submit["spanId"].as_str().unwrap_or("?")))
        })
        .await;
    let submit = named(&submits, "submit");
    assert_eq!(submit.len(), 1, "{submits:#?}");
    assert!(
        submit[0]["parentSpanId"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "submit's span starts the trace: {submits:#?}"
    );
    assert!(
        chained(&submits, submit[0]["spanId"].as_str().unwrap_or("?")),
        "submit's trace lacks the delivery or its platform call: {submits:#?}"
    );
}
