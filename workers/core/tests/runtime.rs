//! The runtime's semantics on the in-memory broker and store, with a scripted platform:
//! the least powerful test that shows each rule. The same rules over RabbitMQ, Redis and
//! real containers are tested end to end in `cli/tests/`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use provisioner_core::policy::RetryPolicy;
use provisioner_core::store::{ClaimRequest, MemoryStore, StateStore};
use provisioner_core::{Broker, MemoryBroker, Platform, PlatformError, Worker, WorkerConfig};
use provisioner_events::{
    ErrorClass, PlatformName, Request, Resource, State, StatusEvent, TeardownTarget,
};

/// A platform whose provision answers come from a script; counts its calls.
#[derive(Default)]
struct Scripted {
    answers: Mutex<VecDeque<Result<(), PlatformError>>>,
    provisions: AtomicUsize,
    panic_first: AtomicBool,
}

#[async_trait]
impl Platform for Scripted {
    fn name(&self) -> PlatformName {
        PlatformName::Process
    }
    fn validate(&self, request: &Request) -> Result<(), PlatformError> {
        match request.spec.as_ref().and_then(|s| s.get("refuse")) {
            Some(_) => Err(PlatformError::permanent(
                ErrorClass::Permission,
                "refused by policy",
            )),
            None => Ok(()),
        }
    }
    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        if self.panic_first.swap(false, Ordering::SeqCst) {
            panic!("scripted panic");
        }
        self.provisions.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let answer = self
            .answers
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or(Ok(()));
        answer.map(|()| Resource {
            id: format!("id-{}", request.request_id),
            name: request.request_id.to_string(),
            ..Default::default()
        })
    }
    async fn teardown(&self, _target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        Ok(None)
    }
    async fn check(&self, request: &Request) -> Result<(), PlatformError> {
        match request.spec.as_ref().and_then(|s| s.get("would_fail")) {
            Some(_) => Err(PlatformError::permanent(
                ErrorClass::Permission,
                "the platform says no",
            )),
            None => Ok(()),
        }
    }
}

struct Harness {
    broker: MemoryBroker,
    store: Arc<MemoryStore>,
    platform: Arc<Scripted>,
    events: BoxStream<'static, StatusEvent>,
}

async fn harness(workers: usize) -> Harness {
    let broker = MemoryBroker::new();
    let store = Arc::new(MemoryStore::new());
    let platform = Arc::new(Scripted::default());
    let events = broker.subscribe_status().await.expect("subscribe");
    for n in 0..workers {
        let config = WorkerConfig {
            worker_id: format!("w{n}"),
            lease: Duration::from_millis(600),
            retry: RetryPolicy {
                max_attempts: 3,
                base_delay: Duration::from_millis(50),
                max_delay: Duration::from_millis(200),
            },
            ..WorkerConfig::default()
        };
        let worker = Arc::new(Worker::new(
            platform.clone(),
            store.clone(),
            Arc::new(broker.clone()),
            config,
        ));
        tokio::spawn(worker.run(std::future::pending()));
    }
    Harness {
        broker,
        store,
        platform,
        events,
    }
}

fn provision(id: &str, extra: &str) -> Vec<u8> {
    format!(r#"{{"schema_version":1,"request_id":"{id}","operation":"provision","platform":"process","spec":{{"program":"x"{extra}}}}}"#).into_bytes()
}

impl Harness {
    async fn publish(&self, body: &[u8]) {
        self.broker
            .publish_request("process.provision", "id", body)
            .await
            .expect("publish");
    }

    /// Events until `count` terminal ones have been seen for `id`.
    async fn until_terminal(&mut self, id: &str, count: usize) -> Vec<StatusEvent> {
        let mut seen = Vec::new();
        let mut terminal = 0;
        tokio::time::timeout(Duration::from_secs(10), async {
            while terminal < count {
                let event = self.events.next().await.expect("events");
                if event.request_id == id {
                    if event.state.is_terminal() {
                        terminal += 1;
                    }
                    seen.push(event);
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{id}: only {seen:?}"));
        seen
    }
}

#[tokio::test]
async fn provision_publishes_starting_then_running_with_increasing_seq() {
    let mut h = harness(1).await;
    h.publish(&provision("p1", "")).await;
    let events = h.until_terminal("p1", 1).await;
    let states: Vec<(State, u64)> = events.iter().map(|e| (e.state, e.seq)).collect();
    assert_eq!(states, vec![(State::Starting, 1), (State::Running, 2)]);
    assert_eq!(events[1].resource.as_ref().expect("resource").id, "id-p1");
}

#[tokio::test]
async fn a_dry_run_asks_the_platform_and_provisions_nothing() {
    let mut h = harness(1).await;
    h.publish(&provision("dry", r#"},"dry_run":true,"x":{"#))
        .await;
    let events = h.until_terminal("dry", 1).await;
    let states: Vec<(State, u64)> = events.iter().map(|e| (e.state, e.seq)).collect();
    assert_eq!(states, vec![(State::NotStarted, 1), (State::Checked, 2)]);
    assert!(events[1].resource.is_none());

    h.publish(&provision(
        "dry-no",
        r#","would_fail":1},"dry_run":true,"x":{"#,
    ))
    .await;
    let events = h.until_terminal("dry-no", 1).await;
    let last = events.last().expect("terminal");
    assert_eq!(last.state, State::Error);
    assert_eq!(
        last.error.as_ref().map(|e| e.class),
        Some(ErrorClass::Permission)
    );
    assert_eq!(h.platform.provisions.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn duplicates_across_workers_run_once_and_answer_identically() {
    let mut h = harness(3).await;
    for _ in 0..5 {
        h.publish(&provision("dup", "")).await;
    }
    let events = h.until_terminal("dup", 5).await;
    let terminal: Vec<&StatusEvent> = events.iter().filter(|e| e.state.is_terminal()).collect();
    assert!(terminal.iter().all(|e| *e == terminal[0]), "{terminal:?}");
    assert_eq!(h.platform.provisions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn same_id_different_payload_is_a_conflict_and_changes_nothing() {
    let mut h = harness(1).await;
    h.publish(&provision("c1", "")).await;
    h.until_terminal("c1", 1).await;
    h.publish(&provision("c1", r#","args":["other"]"#)).await;
    let events = h.until_terminal("c1", 1).await;
    let error = events.last().expect("event").error.clone().expect("error");
    assert_eq!(error.class, ErrorClass::Conflict);
    assert_eq!(h.platform.provisions.load(Ordering::SeqCst), 1);
    assert_eq!(h.broker.dead_letters().len(), 1);
    assert_eq!(
        h.store.get("c1").await.expect("get").expect("record").state,
        State::Running
    );
}

#[tokio::test]
async fn bad_input_is_rejected_dead_lettered_and_the_worker_goes_on() {
    let mut h = harness(1).await;
    h.publish(b"{not json").await;
    h.publish(br#"{"schema_version":1,"request_id":"bad-1","platform":"process"}"#)
        .await;
    h.publish(&provision("refused", r#","refuse":true"#)).await;
    let missing = h.until_terminal("bad-1", 1).await;
    assert_eq!(
        missing[0].error.as_ref().expect("error").class,
        ErrorClass::InvalidRequest
    );
    assert!(
        missing[0]
            .error
            .as_ref()
            .expect("error")
            .message
            .contains("operation")
    );
    let refused = h.until_terminal("refused", 1).await;
    assert_eq!(
        refused[0].error.as_ref().expect("error").class,
        ErrorClass::Permission
    );
    h.publish(&provision("after", "")).await;
    assert_eq!(
        h.until_terminal("after", 1).await.last().expect("e").state,
        State::Running
    );
    let dead = h.broker.dead_letters();
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(
        dead[0].reason.contains("not valid JSON"),
        "{}",
        dead[0].reason
    );
}

#[tokio::test]
async fn transient_failures_are_retried_then_succeed_and_permanent_ones_end_in_error() {
    let mut h = harness(1).await;
    h.platform.answers.lock().expect("lock").extend([
        Err(PlatformError::transient("network blip")),
        Ok(()),
        Err(PlatformError::permanent(
            ErrorClass::NotFound,
            "no such image",
        )),
    ]);
    h.publish(&provision("t1", "")).await;
    let events = h.until_terminal("t1", 1).await;
    let seen: Vec<(State, u32)> = events.iter().map(|e| (e.state, e.attempt)).collect();
    assert_eq!(
        seen,
        vec![
            (State::Starting, 1),
            (State::Starting, 2),
            (State::Running, 2)
        ]
    );
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    h.publish(&provision("t2", "")).await;
    let events = h.until_terminal("t2", 1).await;
    let error = events.last().expect("event").error.clone().expect("error");
    assert_eq!(
        (error.class, error.message.as_str()),
        (ErrorClass::NotFound, "no such image")
    );
}

#[tokio::test]
async fn retries_are_bounded() {
    let mut h = harness(1).await;
    h.platform
        .answers
        .lock()
        .expect("lock")
        .extend((0..5).map(|_| Err(PlatformError::transient("down"))));
    h.publish(&provision("t3", "")).await;
    let events = h.until_terminal("t3", 1).await;
    let last = events.last().expect("event");
    assert_eq!(last.attempt, 3);
    let error = last.error.clone().expect("error");
    assert_eq!(error.class, ErrorClass::Transient);
    assert!(
        error.message.contains("gave up after 3 attempts"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn a_panicking_platform_does_not_kill_the_worker() {
    let mut h = harness(1).await;
    h.platform.panic_first.store(true, Ordering::SeqCst);
    // The first delivery panics after its claim; the requeued one waits out the lease.
    h.publish(&provision("panics", "")).await;
    let events = h.until_terminal("panics", 1).await;
    assert_eq!(events.last().expect("event").state, State::Running);
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_the_old_holder_is_fenced() {
    let mut h = harness(1).await;
    // A worker that died after claiming: its lease runs out, then ours takes over.
    let body = provision("orphan", "");
    let request = provisioner_events::decode_request(&body).expect("request");
    let claim = h
        .store
        .claim(ClaimRequest {
            request_id: "orphan",
            payload_hash: &request.payload_hash(),
            owner: "dead-worker",
            lease: Duration::from_millis(300),
            working_state: State::Starting,
        })
        .await
        .expect("claim");
    assert!(matches!(
        claim,
        provisioner_core::Claim::Claimed { fence: 1, .. }
    ));
    h.publish(&body).await;
    let events = h.until_terminal("orphan", 1).await;
    assert_eq!(events.last().expect("event").state, State::Running);
    assert!(
        h.store.next_seq("orphan", 1).await.is_err(),
        "the dead worker's token is stale"
    );
}

#[tokio::test]
async fn a_teardown_waits_while_its_target_is_being_provisioned() {
    let mut h = harness(1).await;
    // Another worker holds the target's provision for a while yet.
    h.store
        .claim(ClaimRequest {
            request_id: "busy",
            payload_hash: "h",
            owner: "other-worker",
            lease: Duration::from_millis(800),
            working_state: State::Starting,
        })
        .await
        .expect("claim");
    let started = tokio::time::Instant::now();
    h.broker
        .publish_request(
            "process.teardown",
            "busy-down",
            br#"{"schema_version":1,"request_id":"busy-down","operation":"teardown","platform":"process","target_request_id":"busy"}"#,
        )
        .await
        .expect("publish");
    let events = h.until_terminal("busy-down", 1).await;
    assert_eq!(events.last().expect("event").state, State::Stopped);
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "the teardown ran while its target was in progress ({:?})",
        started.elapsed()
    );
}
