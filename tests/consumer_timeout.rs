//! RabbitMQ takes back a delivery held longer than its `consumer_timeout` (30 min by
//! default) and closes the consumer's channel. The worker keeps its platform calls below
//! that (`OPERATION_TIMEOUT_SECONDS`, checked against `BROKER_CONSUMER_TIMEOUT_SECONDS`),
//! and survives a broker configured lower than it was told: the redelivered copy waits
//! for the first attempt's lease, then is answered from its record. This lowers the
//! shared broker's timeout, so it lives alone in this test binary.

mod common;

use std::time::Duration;

use common::oracle::{Ledger, judge};
use common::{TestEnv, id};
use provisioner_core::redis_store::RedisStore;

fn rabbit_env(key: &str, value: u64) {
    common::rabbitmqctl(&[
        "eval",
        &format!("application:set_env(rabbit, {key}, {value})."),
    ]);
}

/// RabbitMQ's defaults again, however the test ends.
struct LoweredTimeout;

impl LoweredTimeout {
    fn set(timeout: Duration) -> Self {
        rabbit_env("consumer_timeout", timeout.as_millis() as u64);
        // Channels look at their deliveries' age on this tick (a minute by default).
        rabbit_env("channel_tick_interval", 500);
        LoweredTimeout
    }
}

impl Drop for LoweredTimeout {
    fn drop(&mut self) {
        rabbit_env("consumer_timeout", 1_800_000);
        rabbit_env("channel_tick_interval", 60_000);
    }
}

#[tokio::test]
async fn a_delivery_held_past_the_brokers_consumer_timeout_is_survived_and_ends_once() {
    let _lowered = LoweredTimeout::set(Duration::from_secs(3));
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("patient");
    let slow = env.web_with(
        "timeout",
        serde_json::json!(["sh", "-c", "sleep 8; exec httpd -f -p 8080"]),
    );
    let body = slow.to_string().into_bytes();
    env.publish_raw("docker.provision", &id(&slow), &body).await;
    let mut ledger = Ledger::default();
    ledger.accepted(&id(&slow), &body);
    events
        .until_all(Duration::from_secs(90), "the request's end", |seen| {
            ledger.all_answered(seen)
        })
        .await;
    events.drain(Duration::from_secs(5)).await;
    let store = RedisStore::connect(&env.redis_url, &env.redis_prefix, Duration::from_secs(600))
        .await
        .expect("redis");
    let verdict = judge(&ledger, &events.seen, &env.containers().await, &store).await;
    verdict.assert_clean();
    assert_eq!(verdict.outcomes.get("running"), Some(&1), "{verdict}");
    let log = env.worker_log("patient");
    assert!(
        log.contains("reconnecting") || log.contains("could not settle"),
        "the worker saw its channel taken away: {log}"
    );
    assert!(
        env.worker(0).try_wait().expect("status").is_none(),
        "and lives on"
    );
}
