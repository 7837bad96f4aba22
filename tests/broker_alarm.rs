//! RabbitMQ's memory alarm: while it is on, the broker blocks every publishing
//! connection. A worker must not hang on a confirm that never comes, nor spin on work it
//! cannot report: it stops taking work, says why, and carries on when the alarm clears.
//! This sets an alarm on the shared broker, so it lives alone in this test binary
//! (`cargo test` runs test binaries one after another).

mod common;

use std::time::Duration;

use common::http::{free_addr, until_status};
use common::{TestEnv, id, rabbitmqctl};
use provisioner_core::Broker;
use provisioner_core::amqp::{AmqpBroker, AmqpConfig};
use provisioner_events::{SCHEMA_VERSION, State, StatusEvent};

/// Clears the alarm however the test ends.
struct Alarm;

impl Alarm {
    fn raise() -> Alarm {
        rabbitmqctl(&["-q", "set_vm_memory_high_watermark", "0.000001"]);
        Alarm
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        rabbitmqctl(&["-q", "set_vm_memory_high_watermark", "0.4"]);
    }
}

#[tokio::test]
async fn a_memory_alarm_pauses_the_work_with_a_clear_reason_and_it_resumes_after() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let webs: Vec<serde_json::Value> = (0..3).map(|n| env.web(&format!("alarm{n}"))).collect();
    for web in &webs {
        env.publish(web).await;
    }
    let alarm = Alarm::raise();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The adapter itself: a publish the alarm blocks fails within its timeout, and the
    // blocked connection is kept, so the broker goes on saying it blocks. (It was dropped
    // as if dead: a fresh one is not blocked until it publishes, so a worker took work it
    // could not report, one failed publish after another.)
    {
        let mut config = AmqpConfig::new(&env.amqp_url);
        config.connection_name = format!("alarm-probe-{}", env.run_id);
        config.publish_timeout = Duration::from_secs(2);
        let broker = AmqpBroker::connect(config).await.expect("connect");
        let event = StatusEvent {
            schema_version: SCHEMA_VERSION,
            request_id: "alarm-probe".into(),
            operation: None,
            platform: "docker".into(),
            state: State::Starting,
            seq: 1,
            attempt: 1,
            timestamp: time::OffsetDateTime::now_utc(),
            resource: None,
            error: None,
            tenant: None,
            rejected_message: None,
            cause: None,
            fleet: None,
        };
        let sent = broker.publish_status(&event).await;
        assert!(sent.is_err(), "published while blocked: {sent:?}");
        assert!(
            broker.blocked().is_some(),
            "after a blocked publish failed ({sent:?}), the broker says it does not block"
        );
    }
    let addr = free_addr();
    let worker = env.start_worker_with("a", &[("METRICS_ADDR", addr.as_str())]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Live, but not ready: it takes no work while the broker blocks it.
    assert!(until_status(&addr, "/live", 200, 10).await);
    assert!(
        until_status(&addr, "/ready", 503, 10).await,
        "ready while blocked: {}",
        env.worker_log("a")
    );
    events.drain(Duration::from_millis(500)).await;
    assert!(
        events.seen.iter().all(|e| !e.state.is_terminal()),
        "nothing can be reported while publishing is blocked: {:#?}",
        events.seen
    );
    assert!(
        env.worker(worker).try_wait().expect("status").is_none(),
        "the worker lives: {}",
        env.worker_log("a")
    );
    let log = env.worker_log("a");
    assert!(log.contains("blocks publishing"), "{log}");
    drop(alarm);
    for web in &webs {
        let ended = events.terminal(&id(web)).await;
        assert_eq!(ended.state, State::Running, "{ended:#?}");
    }
    // Deliveries taken before the block was noticed publish as soon as it lifts; the
    // consumer loop notices at its next look (every BLOCKED_POLL), so wait for the line.
    let mut resumed = false;
    for _ in 0..100 {
        resumed = env.worker_log("a").contains("publishes again");
        if resumed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed, "{}", env.worker_log("a"));
    assert!(
        until_status(&addr, "/ready", 200, 10).await,
        "not ready again after the alarm"
    );
    let containers = env.containers().await;
    assert!(containers.values().all(|c| c.len() == 1), "{containers:?}");
}
