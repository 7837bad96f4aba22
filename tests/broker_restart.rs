//! RabbitMQ itself restarting mid-run. This stops and starts the shared broker, so it
//! lives alone in this test binary: `cargo test` runs test binaries one after another,
//! never beside the other end-to-end tests.

mod common;

use std::time::Duration;

use common::{TestEnv, id, rabbitmqctl};
use provisioner_core::StateStore;
use provisioner_core::redis_store::RedisStore;
use provisioner_events::State;

#[tokio::test]
async fn rabbitmq_restarting_mid_run_loses_no_request_and_the_worker_survives() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let worker = env.start_worker("a");
    let request_ids = common::start_slow_webs(&env, &mut events, "restart", 5, 2).await;

    rabbitmqctl(&["-q", "stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["-q", "start_app"]);
    rabbitmqctl(&["-q", "await_startup"]);

    // Events published while our own subscription was down are gone for us, so the
    // outcome is read where it is kept: the state store and the container engine.
    let store = RedisStore::connect(&env.redis_url, &env.redis_prefix, Duration::from_secs(600))
        .await
        .expect("redis")
        .for_platform(provisioner_events::PlatformName::Docker);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for request_id in &request_ids {
        loop {
            let record = store.get(request_id).await.expect("read record");
            if let Some(result) = record.and_then(|r| r.result) {
                assert_eq!(result.state, State::Running, "{result:#?}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{request_id} never finished; worker log:\n{}",
                env.worker_log("a")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let containers = env.containers().await;
    assert_eq!(containers.len(), request_ids.len(), "{containers:?}");
    assert!(
        containers.values().all(|ids| ids.len() == 1),
        "one container each: {containers:?}"
    );
    assert!(
        env.worker(worker).try_wait().expect("status").is_none(),
        "the worker is still running"
    );

    // It still takes new work after the restart.
    let mut events = env.events().await;
    let after = env.web("after-restart");
    env.publish(&after).await;
    assert_eq!(events.terminal(&id(&after)).await.state, State::Running);
}
