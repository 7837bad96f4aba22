//! Expiry end to end, on the real RabbitMQ, Redis and Podman: a provision with
//! `ttl_seconds` or `expires_at` is torn down when its time is up, once, whichever of
//! several workers is running then, and even when every worker that saw it run has been
//! killed; a teardown before its time leaves nothing for the expiry to do; and an
//! `expires_at` already past makes nothing.

mod common;

use std::time::Duration;

use common::{TestEnv, id};
use provisioner_core::expiry_teardown_id;
use provisioner_events::{ErrorClass, Operation, State};

fn with_ttl(env: &TestEnv, name: &str, ttl_seconds: u64) -> serde_json::Value {
    let mut request = env.web(name);
    request["ttl_seconds"] = ttl_seconds.into();
    request
}

#[tokio::test]
async fn an_expired_resource_is_torn_down_once_even_after_every_worker_that_saw_it_died() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let first = env.start_worker("first");
    let second = env.start_worker("second");
    let web = with_ttl(&env, "ttl", 6);
    env.publish(&web).await;
    let running = events.terminal(&id(&web)).await;
    assert_eq!(running.state, State::Running, "{running:#?}");
    assert_eq!(env.containers().await[&id(&web)].len(), 1);

    // Every worker that saw it run dies; the schedule is in Redis, and new workers take it.
    for worker in [first, second] {
        env.worker(worker).kill().expect("SIGKILL");
        env.worker(worker).wait().expect("reaped");
    }
    env.start_worker("third");
    env.start_worker("fourth");

    let teardown_id = expiry_teardown_id(&id(&web));
    let stopped = events.terminal(&teardown_id).await;
    assert_eq!(
        stopped.state,
        State::Stopped,
        "{stopped:#?}\n{}",
        env.worker_log("third")
    );
    assert_eq!(stopped.operation, Some(Operation::Teardown));
    let cause = stopped.cause.as_deref().unwrap_or_default();
    assert!(cause.starts_with("expired:"), "says why: {stopped:#?}");
    assert!(
        stopped.timestamp - running.timestamp >= time::Duration::seconds(6),
        "not before its time: {running:#?} {stopped:#?}"
    );
    assert!(
        !env.containers().await.contains_key(&id(&web)),
        "the container is gone"
    );
    // Two workers were looking: one teardown, one answer.
    events.drain(Duration::from_secs(4)).await;
    let answers: Vec<_> = events
        .of(&teardown_id)
        .into_iter()
        .filter(|e| e.state.is_terminal())
        .collect();
    assert_eq!(answers.len(), 1, "one teardown: {answers:#?}");
}

#[tokio::test]
async fn a_teardown_before_its_time_leaves_the_expiry_nothing_to_do() {
    // The container takes about 10 s to stop (httpd as PID 1 ignores SIGTERM), so the
    // expiry comes due while the teardown is still at work: it must see that a teardown
    // is in charge and send none of its own.
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("a");
    let web = with_ttl(&env, "early", 3);
    env.publish(&web).await;
    assert_eq!(events.terminal(&id(&web)).await.state, State::Running);
    let down = env.teardown("early-down", &id(&web));
    env.publish(&down).await;
    assert_eq!(events.terminal(&id(&down)).await.state, State::Stopped);
    events.drain(Duration::from_secs(5)).await;
    assert!(
        events.of(&expiry_teardown_id(&id(&web))).is_empty(),
        "no expiry teardown after the resource was torn down: {:#?}",
        events
            .seen
            .iter()
            .map(|e| (e.request_id.as_str(), e.state, e.timestamp))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_provision_whose_expires_at_has_passed_makes_nothing() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("a");
    let mut web = env.web("too-late");
    web["expires_at"] = "2020-01-01T00:00:00Z".into();
    env.publish(&web).await;
    let event = events.terminal(&id(&web)).await;
    assert_eq!(event.state, State::Error, "{event:#?}");
    let error = event.error.expect("error");
    assert_eq!(error.class, ErrorClass::Timeout);
    assert!(error.message.contains("expires_at"), "{}", error.message);
    assert!(!env.containers().await.contains_key(&id(&web)));
}
