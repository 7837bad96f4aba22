//! The runtime's semantics on the in-memory broker and store, with a scripted platform:
//! the least powerful test that shows each rule. The same rules over RabbitMQ, Redis and
//! real containers are tested end to end in the top-level `tests/`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use provisioner_core::policy::RetryPolicy;
use provisioner_core::store::{
    Actor, Claim, ClaimRequest, Fence, MemoryStore, Reaped, Release, Renewal, RequestRecord,
    StateStore, StoreError, TargetGrant,
};
use provisioner_core::{
    Broker, Described, MemoryBroker, Platform, PlatformError, Worker, WorkerConfig,
};
use provisioner_events::{
    ErrorClass, PlatformName, RejectedMessage, Request, Resource, State, StatusEvent,
    TeardownTarget,
};

/// A platform whose provision answers come from a script; counts its calls and keeps
/// the resources it made, so a test can see what is left.
#[derive(Default)]
struct Scripted {
    answers: Mutex<VecDeque<Result<(), PlatformError>>>,
    provisions: AtomicUsize,
    teardowns: AtomicUsize,
    panic_first: AtomicBool,
    panic_always: AtomicBool,
    /// How long a provision takes.
    provision_ms: std::sync::atomic::AtomicU64,
    /// How long the create step takes to land. The platform finishes it even when the
    /// call is dropped meanwhile, as a cloud does with a request it received.
    create_ms: std::sync::atomic::AtomicU64,
    /// How long a teardown takes.
    teardown_ms: std::sync::atomic::AtomicU64,
    /// Provisions dropped before they finished (their future was cancelled).
    abandoned: AtomicUsize,
    existing: Arc<Mutex<std::collections::BTreeSet<String>>>,
    describe_states: Mutex<VecDeque<State>>,
    /// When each provision call began.
    started: Mutex<Vec<tokio::time::Instant>>,
}

/// Counts a provision whose future is dropped before it finishes.
struct Unfinished<'a>(&'a AtomicUsize, bool);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
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
    fn rate_limits(&self, request: &Request) -> Vec<provisioner_core::RateLimit> {
        let spec = request.spec.as_ref();
        if spec.and_then(|s| s.get("paced")).is_some() {
            return vec![provisioner_core::RateLimit::new("Create", "test", 2.0, 5.0)];
        }
        // One call every 4 s: the second waits its turn that long.
        if spec.and_then(|s| s.get("slowly_paced")).is_some() {
            return vec![provisioner_core::RateLimit::new("Slow", "test", 1.0, 0.25)];
        }
        Vec::new()
    }
    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        self.started
            .lock()
            .expect("lock")
            .push(tokio::time::Instant::now());
        if self.panic_first.swap(false, Ordering::SeqCst)
            || self.panic_always.load(Ordering::SeqCst)
        {
            panic!("scripted panic");
        }
        let mut unfinished = Unfinished(&self.abandoned, false);
        self.provisions.fetch_add(1, Ordering::SeqCst);
        // Made first (landing even if this call is dropped), ready after a while: what a
        // cancelled provision leaves behind.
        let create_ms = self.create_ms.load(Ordering::SeqCst);
        let existing = self.existing.clone();
        let id = request.request_id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(create_ms)).await;
            existing.lock().expect("lock").insert(id);
        })
        .await
        .expect("create");
        let ms = self.provision_ms.load(Ordering::SeqCst).max(20);
        let ready = provisioner_core::metrics::health_wait(async {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<(), PlatformError>(())
        })
        .await;
        unfinished.1 = true;
        ready?;
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
    async fn owner_of(
        &self,
        resource_id: &str,
    ) -> Result<Option<provisioner_events::RequestId>, PlatformError> {
        let id = resource_id.strip_prefix("id-").unwrap_or_default();
        Ok(self
            .exists(id)
            .then(|| provisioner_events::RequestId::new(id).expect("id")))
    }
    async fn owned(&self) -> Result<Vec<provisioner_core::Owned>, PlatformError> {
        // Everything it made, made long ago, marked with the request that made it.
        let existing = self.existing.lock().expect("lock").clone();
        Ok(existing
            .into_iter()
            .map(|id| provisioner_core::Owned {
                resource: Resource {
                    id: format!("id-{id}"),
                    name: id.clone(),
                    ..Default::default()
                },
                request_id: provisioner_events::RequestId::new(id.as_str()).expect("id"),
                created: Some(SystemTime::UNIX_EPOCH),
            })
            .collect())
    }
    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        self.teardowns.fetch_add(1, Ordering::SeqCst);
        let ms = self.teardown_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let id = match target {
            TeardownTarget::Request(id) => id.to_string(),
            TeardownTarget::Resource(resource) => {
                resource.strip_prefix("id-").unwrap_or_default().to_owned()
            }
        };
        let removed = self.existing.lock().expect("lock").remove(id.as_str());
        Ok(removed.then(|| Resource {
            id: format!("id-{id}"),
            name: id.to_string(),
            ..Default::default()
        }))
    }
    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        let state = self
            .describe_states
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or(State::Running);
        Ok(Some(Described {
            state,
            resource: Resource {
                id: "id".into(),
                name: target.to_string(),
                ..Default::default()
            },
        }))
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

impl Scripted {
    fn exists(&self, id: &str) -> bool {
        self.existing.lock().expect("lock").contains(id)
    }
}

struct Harness {
    broker: MemoryBroker,
    store: Arc<dyn StateStore>,
    memory: Arc<MemoryStore>,
    platform: Arc<Scripted>,
    events: BoxStream<'static, StatusEvent>,
}

fn config(n: usize) -> WorkerConfig {
    WorkerConfig {
        worker_id: format!("w{n}"),
        lease: Duration::from_millis(600),
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
        },
        max_waits: 20,
        ..WorkerConfig::default()
    }
}

async fn harness(workers: usize) -> Harness {
    harness_with(workers, config, |store| store).await
}

async fn harness_with(
    workers: usize,
    configure: impl Fn(usize) -> WorkerConfig,
    wrap: impl Fn(Arc<dyn StateStore>) -> Arc<dyn StateStore>,
) -> Harness {
    let broker = MemoryBroker::new();
    let memory = Arc::new(MemoryStore::new());
    let store = wrap(memory.clone());
    let platform = Arc::new(Scripted::default());
    let events = broker.subscribe_status().await.expect("subscribe");
    for n in 0..workers {
        let worker = Arc::new(Worker::new(
            platform.clone(),
            store.clone(),
            Arc::new(broker.clone()),
            configure(n),
        ));
        tokio::spawn(worker.run(std::future::pending()));
    }
    Harness {
        broker,
        store,
        memory,
        platform,
        events,
    }
}

/// One worker of a deployment that signs with the key `k1`, and the keys.
async fn signing_harness() -> (Arc<provisioner_core::signing::SigningKeys>, Harness) {
    let keys = Arc::new(
        provisioner_core::signing::SigningKeys::parse(
            "k1=a-secret-of-at-least-thirty-two-bytes!!",
            Duration::from_secs(3600),
        )
        .expect("keys"),
    );
    let signing = keys.clone();
    let h = harness_with(
        1,
        move |n| WorkerConfig {
            signing: Some(signing.clone()),
            ..config(n)
        },
        |store| store,
    )
    .await;
    (keys, h)
}

fn provision(id: &str, extra: &str) -> Vec<u8> {
    format!(r#"{{"schema_version":1,"request_id":"{id}","operation":"provision","platform":"process","spec":{{"program":"x"{extra}}}}}"#).into_bytes()
}

fn acting(operation: &str, id: &str, target: &str) -> Vec<u8> {
    format!(r#"{{"schema_version":1,"request_id":"{id}","operation":"{operation}","platform":"process","target_request_id":"{target}"}}"#).into_bytes()
}

fn claim_request<'a>(
    id: &'a str,
    hash: &'a str,
    owner: &'a str,
    lease: Duration,
) -> ClaimRequest<'a> {
    ClaimRequest {
        request_id: id,
        payload_hash: hash,
        owner,
        nonce: owner,
        lease,
        working_state: State::Starting,
        routing_key: "process.provision",
    }
}

impl Harness {
    async fn publish(&self, body: &[u8]) {
        let request = provisioner_events::decode_request(body);
        let key = request.map_or("process.provision".into(), |r| r.routing_key());
        self.broker
            .publish_request(&key, "id", body)
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

    async fn record(&self, id: &str) -> RequestRecord {
        self.store.get(id).await.expect("get").expect("record")
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
async fn a_conflicting_duplicate_is_refused_as_a_message_and_changes_nothing() {
    let mut h = harness(1).await;
    h.publish(&provision("c1", "")).await;
    h.until_terminal("c1", 1).await;
    let other = provision("c1", r#","args":["other"]"#);
    h.publish(&other).await;
    let events = h.until_terminal("c1", 1).await;
    let refusal = events.last().expect("event");
    assert_eq!(
        refusal.error.as_ref().expect("error").class,
        ErrorClass::Conflict
    );
    assert_eq!(refusal.seq, 0);
    // It names the message it answers, so nobody takes it for the request's outcome.
    assert_eq!(refusal.rejected_message, Some(RejectedMessage::of(&other)));
    assert!(!refusal.ends_request());
    assert!(refusal.answers(&other));
    assert!(!refusal.answers(&provision("c1", "")));
    assert_eq!(h.platform.provisions.load(Ordering::SeqCst), 1);
    assert_eq!(h.broker.dead_letters().len(), 1);
    assert_eq!(h.record("c1").await.state, State::Running);
}

#[tokio::test]
async fn bad_input_is_rejected_dead_lettered_and_the_worker_goes_on() {
    let mut h = harness(1).await;
    h.publish(b"{not json").await;
    h.publish(br#"{"schema_version":1,"request_id":"bad-1","platform":"process"}"#)
        .await;
    h.publish(&provision("refused", r#","refuse":true"#)).await;
    // An id far over AMQP's 255-byte short strings is echoed cut, never refused by the broker.
    let long_id = "x".repeat(1000);
    h.publish(format!(r#"{{"request_id":"{long_id}"}}"#).as_bytes())
        .await;
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
    assert!(missing[0].rejected_message.is_some());
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
    assert_eq!(dead.len(), 4, "{dead:?}");
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
    assert_eq!(error.class, ErrorClass::NotFound);
    assert!(
        error.message.starts_with("no such image"),
        "{}",
        error.message
    );
    assert!(
        !h.platform.exists("t2"),
        "a provision that ends in error leaves nothing behind"
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
    assert!(
        error.message.contains("what it had made was removed"),
        "{}",
        error.message
    );
    assert!(!h.platform.exists("t3"));
}

#[tokio::test]
async fn a_panic_after_the_claim_counts_as_a_failed_attempt() {
    let mut h = harness(1).await;
    h.platform.panic_first.store(true, Ordering::SeqCst);
    h.publish(&provision("panics", "")).await;
    let events = h.until_terminal("panics", 1).await;
    let last = events.last().expect("event");
    assert_eq!(last.state, State::Running);
    assert_eq!(
        last.attempt, 2,
        "the panicked attempt counted, and no lease was waited out"
    );
}

#[tokio::test]
async fn a_request_that_always_panics_ends_in_error_and_is_dead_lettered() {
    let mut h = harness(1).await;
    h.platform.panic_always.store(true, Ordering::SeqCst);
    h.publish(&provision("poison", "")).await;
    let events = h.until_terminal("poison", 1).await;
    let last = events.last().expect("event");
    let error = last.error.clone().expect("error");
    assert_eq!(
        (last.state, error.class),
        (State::Error, ErrorClass::Internal)
    );
    assert!(error.message.contains("panicked"), "{}", error.message);
    assert_eq!(last.attempt, 3);
    let dead = h.broker.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("panicked"), "{}", dead[0].reason);
}

#[tokio::test]
async fn attempts_that_end_without_an_outcome_are_bounded_too() {
    let mut h = harness(1).await;
    let body = provision("crashy", "");
    let hash = provisioner_events::decode_request(&body)
        .expect("request")
        .payload_hash();
    // Three workers each claimed it and died (no release, no outcome).
    for n in 0..3 {
        let owner = format!("dead-{n}");
        h.store
            .claim(claim_request(
                "crashy",
                &hash,
                &owner,
                Duration::from_millis(1),
            ))
            .await
            .expect("claim");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.platform
        .existing
        .lock()
        .expect("lock")
        .insert("crashy".into());
    h.publish(&body).await;
    let events = h.until_terminal("crashy", 1).await;
    let last = events.last().expect("event");
    let error = last.error.clone().expect("error");
    assert_eq!(
        (last.state, error.class),
        (State::Error, ErrorClass::Internal)
    );
    assert!(
        error.message.contains("gave up after 3 attempts"),
        "{}",
        error.message
    );
    assert!(
        !h.platform.exists("crashy"),
        "what the crashed attempts made is removed"
    );
    assert_eq!(h.platform.provisions.load(Ordering::SeqCst), 0);
    assert_eq!(h.broker.dead_letters().len(), 1);
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_the_old_holder_is_fenced() {
    let mut h = harness(1).await;
    // A worker that died after claiming: its lease runs out, then ours takes over.
    let body = provision("orphan", "");
    let request = provisioner_events::decode_request(&body).expect("request");
    let hash = request.payload_hash();
    let claim = h
        .store
        .claim(claim_request(
            "orphan",
            &hash,
            "dead-worker",
            Duration::from_millis(300),
        ))
        .await
        .expect("claim");
    let Claim::Claimed { fence: dead, .. } = claim else {
        panic!("{claim:?}");
    };
    h.publish(&body).await;
    let events = h.until_terminal("orphan", 1).await;
    let last = events.last().expect("event");
    assert_eq!((last.state, last.attempt), (State::Running, 2));
    assert!(
        h.store
            .renew("orphan", &dead, Duration::from_secs(1))
            .await
            .is_err(),
        "the dead worker's token is stale"
    );
}

#[tokio::test]
async fn a_duplicate_held_too_long_is_refused_as_a_message() {
    let mut h = harness_with(
        1,
        |n| WorkerConfig {
            max_waits: 2,
            ..config(n)
        },
        |store| store,
    )
    .await;
    let body = provision("stuck", "");
    let hash = provisioner_events::decode_request(&body)
        .expect("request")
        .payload_hash();
    // Another worker holds it and keeps renewing (a long provision).
    let lease = Duration::from_millis(600);
    let Claim::Claimed { fence, .. } = h
        .store
        .claim(claim_request("stuck", &hash, "slow-worker", lease))
        .await
        .expect("claim")
    else {
        panic!("not claimed");
    };
    let store = h.store.clone();
    let renewing = tokio::spawn(async move {
        loop {
            tokio::time::sleep(lease / 3).await;
            store.renew("stuck", &fence, lease).await.expect("renew");
        }
    });
    h.publish(&body).await;
    let events = h.until_terminal("stuck", 1).await;
    let refusal = events.last().expect("event");
    assert_eq!(
        refusal.rejected_message,
        Some(RejectedMessage::of(&body)),
        "about this message, not the request the other worker holds"
    );
    assert!(
        refusal
            .error
            .as_ref()
            .expect("error")
            .message
            .contains("waited 2 times"),
        "{refusal:?}"
    );
    assert_eq!(h.broker.dead_letters().len(), 1);
    assert!(
        h.record("stuck").await.lease_remaining.is_some(),
        "the holder keeps it"
    );
    renewing.abort();
}

#[tokio::test]
async fn a_teardown_before_its_provision_means_the_provision_never_runs() {
    let mut h = harness(1).await;
    h.publish(&acting("teardown", "early-down", "early")).await;
    let down = h.until_terminal("early-down", 1).await;
    assert_eq!(down.last().expect("event").state, State::Stopped);
    h.publish(&provision("early", "")).await;
    let events = h.until_terminal("early", 1).await;
    let last = events.last().expect("event");
    let error = last.error.clone().expect("error");
    assert_eq!(
        (last.state, error.class),
        (State::Error, ErrorClass::Conflict)
    );
    assert!(error.message.contains("early-down"), "{}", error.message);
    assert_eq!(h.platform.provisions.load(Ordering::SeqCst), 0);
    assert!(!h.platform.exists("early"));
}

#[tokio::test]
async fn a_teardown_during_a_provision_cancels_it_and_leaves_nothing() {
    let mut h = harness(2).await;
    h.platform.provision_ms.store(5_000, Ordering::SeqCst);
    h.publish(&provision("slow", "")).await;
    // Wait until the provision is at work, then tear it down.
    loop {
        let event = h.events.next().await.expect("events");
        if event.request_id == "slow" && event.state == State::Starting {
            break;
        }
    }
    let started = tokio::time::Instant::now();
    h.publish(&acting("teardown", "slow-down", "slow")).await;
    let provision = h.until_terminal("slow", 1).await;
    let last = provision.last().expect("event");
    assert_eq!(
        (last.state, last.error.as_ref().map(|e| e.class)),
        (State::Error, Some(ErrorClass::Conflict))
    );
    let down = h.until_terminal("slow-down", 1).await;
    assert_eq!(down.last().expect("event").state, State::Stopped);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cancelled between steps, not after the provision's 5 s"
    );
    assert_eq!(
        h.platform.abandoned.load(Ordering::SeqCst),
        0,
        "the call ended by itself: its health wait was cut short, the call not dropped"
    );
    assert!(!h.platform.exists("slow"), "nothing left after stopped");
}

#[tokio::test]
async fn a_create_still_on_its_way_when_the_teardown_comes_is_removed_once_it_lands() {
    let mut h = harness(2).await;
    // Longer than a dropped create is given to land: only waiting for it removes it.
    h.platform.create_ms.store(4_000, Ordering::SeqCst);
    let created_by = tokio::time::Instant::now() + Duration::from_millis(4_500);
    h.publish(&provision("late", "")).await;
    loop {
        let event = h.events.next().await.expect("events");
        if event.request_id == "late" && event.state == State::Starting {
            break;
        }
    }
    h.publish(&acting("teardown", "late-down", "late")).await;
    let provision = h.until_terminal("late", 1).await;
    let last = provision.last().expect("event");
    assert_eq!(
        (last.state, last.error.as_ref().map(|e| e.class)),
        (State::Error, Some(ErrorClass::Conflict)),
        "{last:#?}"
    );
    let down = h.until_terminal("late-down", 1).await;
    assert_eq!(down.last().expect("event").state, State::Stopped);
    tokio::time::sleep_until(created_by).await;
    assert!(!h.platform.exists("late"), "the late create was removed");
    assert_eq!(h.platform.provisions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stop_and_a_start_of_one_resource_never_run_at_once() {
    let mut h = harness(2).await;
    h.publish(&provision("vm", "")).await;
    h.until_terminal("vm", 1).await;
    // While a stop holds the resource, a start waits for it.
    let stop = Actor {
        request_id: "vm-stop",
        nonce: "n",
    };
    assert_eq!(
        h.store
            .act_on("vm", stop, Duration::from_millis(800), false)
            .await
            .expect("act"),
        TargetGrant::Granted
    );
    let started = tokio::time::Instant::now();
    h.publish(&acting("describe", "vm-look", "vm")).await;
    h.until_terminal("vm-look", 1).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "describe only reads"
    );
    h.publish(&acting("reboot", "vm-reboot", "vm")).await;
    h.until_terminal("vm-reboot", 1).await;
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "the reboot ran while a stop was acting ({:?})",
        started.elapsed()
    );
}

#[tokio::test]
async fn describe_waits_for_a_resource_in_transition_to_settle() {
    let mut h = harness(1).await;
    h.platform.describe_states.lock().expect("lock").extend([
        State::Starting,
        State::Starting,
        State::Running,
    ]);
    h.publish(&acting("describe", "look", "thing")).await;
    let events = h.until_terminal("look", 1).await;
    assert_eq!(events.last().expect("event").state, State::Running);
}

#[tokio::test]
async fn describe_of_a_resource_that_never_settles_ends_all_the_same() {
    let mut h = harness_with(
        1,
        |n| WorkerConfig {
            describe_settle: Duration::from_secs(1),
            ..config(n)
        },
        |store| store,
    )
    .await;
    h.platform
        .describe_states
        .lock()
        .expect("lock")
        .extend([State::Stopping; 10]);
    h.publish(&acting("describe", "look-2", "thing")).await;
    let events = h.until_terminal("look-2", 1).await;
    let last = events.last().expect("event");
    assert_eq!(last.state, State::Error);
    assert_eq!(
        last.error.as_ref().map(|e| e.class),
        Some(ErrorClass::Timeout)
    );
}

#[tokio::test]
async fn a_message_older_than_the_retention_is_not_run_again() {
    let mut h = harness_with(
        1,
        |n| WorkerConfig {
            retention: Duration::from_secs(3600),
            ..config(n)
        },
        |store| store,
    )
    .await;
    let body = provision("ancient", "");
    h.broker
        .publish_request_at(
            "process.provision",
            &body,
            SystemTime::now() - Duration::from_secs(7200),
        )
        .expect("publish");
    let events = h.until_terminal("ancient", 1).await;
    let last = events.last().expect("event");
    assert_eq!(last.rejected_message, Some(RejectedMessage::of(&body)));
    assert!(
        last.error
            .as_ref()
            .expect("error")
            .message
            .contains("not run again"),
        "{last:?}"
    );
    assert_eq!(h.platform.provisions.load(Ordering::SeqCst), 0);
}

/// A store whose renewals never answer in time: Redis partitioned away mid-attempt.
struct RenewalsHang(Arc<dyn StateStore>);

#[async_trait]
impl StateStore for RenewalsHang {
    async fn claim(&self, claim: ClaimRequest<'_>) -> Result<Claim, StoreError> {
        self.0.claim(claim).await
    }
    async fn renew(&self, _: &str, _: &Fence, _: Duration) -> Result<Renewal, StoreError> {
        std::future::pending().await
    }
    async fn complete(&self, id: &str, f: &Fence, e: &StatusEvent) -> Result<(), StoreError> {
        self.0.complete(id, f, e).await
    }
    async fn release(&self, id: &str, f: &Fence, how: Release) -> Result<(), StoreError> {
        self.0.release(id, f, how).await
    }
    async fn act_on(
        &self,
        t: &str,
        a: Actor<'_>,
        l: Duration,
        tomb: bool,
    ) -> Result<TargetGrant, StoreError> {
        self.0.act_on(t, a, l, tomb).await
    }
    async fn renew_act(&self, t: &str, a: Actor<'_>, l: Duration) -> Result<(), StoreError> {
        self.0.renew_act(t, a, l).await
    }
    async fn lift_tombstone(&self, t: &str, by: &str) -> Result<(), StoreError> {
        self.0.lift_tombstone(t, by).await
    }
    async fn remember_handed_on(&self, key: &str, ttl: Duration) -> Result<(), StoreError> {
        self.0.remember_handed_on(key, ttl).await
    }
    async fn was_handed_on(&self, key: &str) -> Result<bool, StoreError> {
        self.0.was_handed_on(key).await
    }
    async fn schedule_expiry(
        &self,
        p: &str,
        id: &str,
        at: std::time::SystemTime,
    ) -> Result<(), StoreError> {
        self.0.schedule_expiry(p, id, at).await
    }
    async fn take_due_expiries(
        &self,
        p: &str,
        n: usize,
        retry: Duration,
    ) -> Result<Vec<(String, std::time::SystemTime)>, StoreError> {
        self.0.take_due_expiries(p, n, retry).await
    }
    async fn cancel_expiry(&self, p: &str, id: &str) -> Result<(), StoreError> {
        self.0.cancel_expiry(p, id).await
    }
    async fn reserve_quota(
        &self,
        tenant: &str,
        id: &str,
        fence: &Fence,
        cost: &provisioner_core::QuotaCost,
    ) -> Result<provisioner_core::QuotaGrant, StoreError> {
        self.0.reserve_quota(tenant, id, fence, cost).await
    }
    async fn release_quota(&self, id: &str) -> Result<(), StoreError> {
        self.0.release_quota(id).await
    }
    async fn set_quota(
        &self,
        tenant: &str,
        unit: &str,
        limit: Option<u64>,
    ) -> Result<(), StoreError> {
        self.0.set_quota(tenant, unit, limit).await
    }
    async fn quota(&self, tenant: &str) -> Result<provisioner_core::QuotaUsage, StoreError> {
        self.0.quota(tenant).await
    }
    async fn end_act(&self, t: &str, a: Actor<'_>, s: Option<State>) -> Result<(), StoreError> {
        self.0.end_act(t, a, s).await
    }
    async fn stale(&self, p: &str, i: Duration, n: usize) -> Result<Vec<String>, StoreError> {
        self.0.stale(p, i, n).await
    }
    async fn reap(
        &self,
        id: &str,
        i: Duration,
        o: &str,
        n: &str,
        l: Duration,
    ) -> Result<Option<Reaped>, StoreError> {
        self.0.reap(id, i, o, n, l).await
    }
    async fn next_seq(&self, id: &str, f: &Fence) -> Result<u64, StoreError> {
        self.0.next_seq(id, f).await
    }
    async fn put_fleet(&self, id: &str, json: &str) -> Result<(), StoreError> {
        self.0.put_fleet(id, json).await
    }
    async fn fleet(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.0.fleet(id).await
    }
    async fn take_tokens(
        &self,
        key: &str,
        limit: &provisioner_core::RateLimit,
        max_wait: Duration,
    ) -> Result<provisioner_core::TokenGrant, StoreError> {
        self.0.take_tokens(key, limit, max_wait).await
    }
    async fn adapt_rate(
        &self,
        key: &str,
        limit: &provisioner_core::RateLimit,
        throttled: bool,
    ) -> Result<(), StoreError> {
        self.0.adapt_rate(key, limit, throttled).await
    }
    async fn get(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        self.0.get(id).await
    }
    async fn take_turn(&self, key: &str, hold: Duration) -> Result<bool, StoreError> {
        self.0.take_turn(key, hold).await
    }
}

#[tokio::test]
async fn a_lease_that_cannot_be_renewed_stops_the_work_before_it_ends() {
    let h = harness_with(1, config, |store| Arc::new(RenewalsHang(store))).await;
    h.platform.provision_ms.store(10_000, Ordering::SeqCst);
    h.publish(&provision("partitioned", "")).await;
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), async {
        while h.platform.abandoned.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the platform call is stopped");
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "stopped before the 600 ms lease ended elsewhere ({:?})",
        started.elapsed()
    );
    let _ = &h.memory;
}

#[tokio::test]
async fn a_request_abandoned_long_ago_is_ended_and_what_it_made_removed() {
    let mut h = harness_with(
        1,
        |n| WorkerConfig {
            reap_after: Some(Duration::from_millis(400)),
            ..config(n)
        },
        |store| store,
    )
    .await;
    // Its worker died after making something, and its message is gone.
    h.store
        .claim(claim_request(
            "lost-msg",
            "h",
            "dead",
            Duration::from_millis(10),
        ))
        .await
        .expect("claim");
    h.platform
        .existing
        .lock()
        .expect("lock")
        .insert("lost-msg".into());
    let events = h.until_terminal("lost-msg", 1).await;
    let last = events.last().expect("event");
    let error = last.error.clone().expect("error");
    assert_eq!(
        (last.state, error.class),
        (State::Error, ErrorClass::Internal)
    );
    assert!(error.message.contains("abandoned"), "{}", error.message);
    assert!(!h.platform.exists("lost-msg"));
    assert_eq!(h.record("lost-msg").await.result.as_ref(), Some(last));
}

#[tokio::test]
async fn a_teardown_by_resource_id_between_retries_tombstones_its_provision() {
    let mut h = harness(2).await;
    let mut blip = PlatformError::transient("a blip after making the resource");
    blip.retry_after = Some(Duration::from_secs(2));
    h.platform
        .answers
        .lock()
        .expect("lock")
        .push_back(Err(blip));
    h.publish(&provision("by-res", "")).await;
    // The first attempt made the resource and failed; its retry is two seconds away.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !h.platform.exists("by-res")
            || h.store
                .get("by-res")
                .await
                .expect("get")
                .is_none_or(|r| r.lease_remaining.is_some())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("between retries");
    h.publish(
        br#"{"schema_version":1,"request_id":"by-res-down","operation":"teardown","platform":"process","resource_id":"id-by-res"}"#,
    )
    .await;
    let down = h.until_terminal("by-res-down", 1).await;
    assert_eq!(down.last().expect("event").state, State::Stopped);
    assert!(!h.platform.exists("by-res"));
    let provision = h.until_terminal("by-res", 1).await;
    let last = provision.last().expect("event");
    assert_eq!(
        (last.state, last.error.as_ref().map(|e| e.class)),
        (State::Error, Some(ErrorClass::Conflict)),
        "the retry found the tombstone: {last:?}"
    );
    assert!(!h.platform.exists("by-res"), "and made nothing again");
    assert_eq!(
        h.record("by-res").await.torn_down_by.as_deref(),
        Some("by-res-down")
    );
}

/// The in-memory broker, except that the broker refuses the first working event's
/// confirm (after a moment, as a late nack would come): the event went out, the broker
/// did not take it.
/// A broker that refuses (nacks) the first status event of one state.
struct FirstEventRefused {
    broker: MemoryBroker,
    state: State,
    refused: AtomicBool,
}

#[async_trait]
impl Broker for FirstEventRefused {
    async fn declare(&self, platform: PlatformName) -> Result<(), provisioner_core::BrokerError> {
        self.broker.declare(platform).await
    }
    async fn consume(
        &self,
        platform: PlatformName,
        prefetch: u16,
    ) -> Result<provisioner_core::broker::DeliveryStream, provisioner_core::BrokerError> {
        self.broker.consume(platform, prefetch).await
    }
    async fn send_status(
        &self,
        event: &StatusEvent,
    ) -> Result<provisioner_core::broker::PendingConfirm, provisioner_core::BrokerError> {
        let confirm = self.broker.send_status(event).await?;
        if event.state == self.state && !self.refused.swap(true, Ordering::SeqCst) {
            return Ok(Box::pin(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(provisioner_core::BrokerError::NotConfirmed(
                    "nack (test)".into(),
                ))
            }));
        }
        Ok(confirm)
    }
    async fn publish_request(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
    ) -> Result<(), provisioner_core::BrokerError> {
        self.broker
            .publish_request(routing_key, request_id, body)
            .await
    }
    async fn publish_derived_request(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
        headers: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), provisioner_core::BrokerError> {
        self.broker
            .publish_derived_request(routing_key, request_id, body, headers)
            .await
    }
    async fn subscribe_status(
        &self,
    ) -> Result<BoxStream<'static, StatusEvent>, provisioner_core::BrokerError> {
        self.broker.subscribe_status().await
    }
}

#[tokio::test]
async fn a_refused_working_event_is_not_acknowledged_though_its_confirm_is_awaited_late() {
    // The working event's confirm is awaited with the terminal event's, after the
    // platform call: a refusal found then must still give the message back, so the
    // request is answered again from its record rather than settled with a lost event.
    let broker = MemoryBroker::new();
    let platform = Arc::new(Scripted::default());
    let store = Arc::new(MemoryStore::new());
    let mut events = broker.subscribe_status().await.expect("subscribe");
    let worker = Arc::new(Worker::new(
        platform.clone(),
        store,
        Arc::new(FirstEventRefused {
            broker: broker.clone(),
            state: State::Starting,
            refused: AtomicBool::new(false),
        }),
        config(0),
    ));
    tokio::spawn(worker.run(std::future::pending()));
    broker
        .publish_request("process.provision", "w1", &provision("w1", ""))
        .await
        .expect("publish");
    let mut running = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        while running < 2 {
            let event = events.next().await.expect("events");
            if event.request_id == "w1" && event.state == State::Running {
                running += 1;
            }
        }
    })
    .await
    .expect("the message came back and was answered from its record");
    assert_eq!(
        platform.provisions.load(Ordering::SeqCst),
        1,
        "answered from the record, not provisioned again"
    );
}

#[tokio::test]
async fn an_end_the_broker_refused_goes_on_the_outbox_until_a_copy_publishes_it() {
    // The refused end stays on the outbox; the message comes back, its record answers
    // with the end, and that publish, confirmed, takes it off.
    let broker = MemoryBroker::new();
    let platform = Arc::new(Scripted::default());
    let store = Arc::new(MemoryStore::new());
    let mut events = broker.subscribe_status().await.expect("subscribe");
    let worker = Arc::new(Worker::new(
        platform.clone(),
        store.clone(),
        Arc::new(FirstEventRefused {
            broker: broker.clone(),
            state: State::Running,
            refused: AtomicBool::new(false),
        }),
        WorkerConfig {
            expire_every: None,
            reap_after: None,
            ..config(0)
        },
    ));
    let outbox = provisioner_core::runtime::ends_outbox(platform.name());
    tokio::spawn(worker.clone().run(std::future::pending()));
    broker
        .publish_request("process.provision", "o1", &provision("o1", ""))
        .await
        .expect("publish");
    // The refused one reached the topic all the same (a nack says nothing either way),
    // and the copy answers again from its record.
    let mut running = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while running.len() < 2 {
            let event = events.next().await.expect("events");
            if event.request_id == "o1" && event.state == State::Running {
                running.push(event);
            }
        }
    })
    .await
    .expect("answered again from its record");
    assert_eq!(running[0], running[1], "the same end, its seq unchanged");
    tokio::time::timeout(Duration::from_secs(5), async {
        while !store.scheduled(&outbox).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the confirmed copy took the end off the outbox");
    assert_eq!(platform.provisions.load(Ordering::SeqCst), 1);
}

/// The system clock, moved on by as much as the test says.
#[derive(Debug, Default)]
struct LateClock(std::sync::atomic::AtomicU64);

impl provisioner_core::Environment for LateClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_secs(self.0.load(Ordering::SeqCst))
    }
    fn random_u64(&self) -> u64 {
        rand::random()
    }
}

#[tokio::test]
async fn an_end_recorded_by_a_worker_that_died_before_publishing_it_is_published_by_housekeeping() {
    // The worker that recorded it died before publishing it or giving back its quota
    // place, and its message is gone too (acked by a drain, or purged): only the outbox
    // still knows of the end, and the round that publishes it frees what it frees.
    let broker = MemoryBroker::new();
    let platform = Arc::new(Scripted::default());
    let clock = Arc::new(LateClock::default());
    let store = Arc::new(MemoryStore::new().with_environment(clock.clone()));
    let mut events = broker.subscribe_status().await.expect("subscribe");
    let worker = Worker::new(
        platform.clone(),
        store.clone(),
        Arc::new(broker.clone()),
        WorkerConfig {
            expire_every: None,
            reap_after: None,
            ..config(0)
        },
    );
    let outbox = provisioner_core::runtime::ends_outbox(platform.name());
    let Claim::Claimed { fence, seq, .. } = store
        .claim(ClaimRequest {
            request_id: "d1",
            payload_hash: "h",
            owner: "the-dead-one",
            nonce: "n1",
            lease: Duration::from_secs(30),
            working_state: State::Starting,
            routing_key: "process.provision",
        })
        .await
        .expect("claim")
    else {
        panic!("a fresh record is claimed");
    };
    store
        .reserve_quota("t1", "d1", &fence, &Default::default())
        .await
        .expect("reserve");
    assert_eq!(store.quota("t1").await.expect("quota").used, 1);
    let end = StatusEvent {
        schema_version: provisioner_events::SCHEMA_VERSION,
        request_id: "d1".into(),
        operation: Some(provisioner_events::Operation::Provision),
        platform: platform.name().as_str().into(),
        state: State::Error,
        seq: seq + 1,
        attempt: 1,
        timestamp: time::OffsetDateTime::now_utc(),
        resource: None,
        error: Some(provisioner_events::ErrorInfo {
            class: ErrorClass::Capacity,
            message: "no capacity; nothing was made".into(),
        }),
        tenant: Some("t1".into()),
        rejected_message: None,
        cause: None,
        fleet: None,
    };
    store.complete("d1", &fence, &end).await.expect("complete");
    worker.expire_once().await.expect("a round");
    assert_eq!(
        store.scheduled(&outbox).len(),
        1,
        "within its grace the end is left to its publisher"
    );
    clock.0.store(
        provisioner_core::store::ENDS_GRACE.as_secs() + 1,
        Ordering::SeqCst,
    );
    worker.expire_once().await.expect("a round");
    let published = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let event = events.next().await.expect("events");
            if event.request_id == "d1" {
                return event;
            }
        }
    })
    .await
    .expect("the round published the end");
    assert_eq!(published, end);
    assert!(
        store.scheduled(&outbox).is_empty(),
        "published, so taken off"
    );
    assert_eq!(
        store.quota("t1").await.expect("quota").used,
        0,
        "the error end gave its quota place back"
    );
}

fn fleet(id: &str, count: u32, extra: &str) -> Vec<u8> {
    format!(r#"{{"schema_version":1,"request_id":"{id}","operation":"provision","platform":"process","count":{count}{extra},"spec":{{"program":"x"}}}}"#).into_bytes()
}

/// Checks a fleet's own events: seq 1, 2, 3… without a gap, counts out of `count` on
/// every one, and the terminal one last.
fn check_fleet_events(events: &[StatusEvent], count: u32) {
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.seq, i as u64 + 1, "{events:#?}");
        let fleet = event.fleet.as_ref().expect("fleet status");
        assert_eq!(fleet.count, count);
        assert_eq!(fleet.members.expect("counts").total(), count);
    }
    assert!(events.last().expect("events").state.is_terminal());
}

#[tokio::test]
async fn a_fleet_is_spread_over_the_workers_and_ends_listing_its_members() {
    let mut h = harness(3).await;
    // Duplicates of the fleet's message change nothing.
    for _ in 0..3 {
        h.publish(&fleet("f1", 6, "")).await;
    }
    let events = h.until_terminal("f1", 1).await;
    check_fleet_events(&events, 6);
    let last = events.last().expect("terminal");
    assert_eq!(last.state, State::Running, "{last:#?}");
    let members = &last.resource.as_ref().expect("resource").members;
    assert_eq!(members.len(), 6);
    for (i, member) in members.iter().enumerate() {
        assert_eq!(member.request_id, format!("f1#{i}"));
        assert_eq!(member.state, State::Running);
        assert_eq!(member.id.as_deref(), Some(format!("id-f1#{i}").as_str()));
    }
    assert_eq!(h.platform.provisions.load(Ordering::SeqCst), 6);
    // Every member is a request of its own, telling which fleet it belongs to.
    let member = h.record("f1#3").await;
    let result = member.result.expect("member result");
    assert_eq!(result.fleet.as_ref().and_then(|f| f.index), Some(3));
    assert_eq!(
        result.fleet.as_ref().map(|f| f.request_id.as_str()),
        Some("f1")
    );

    // A teardown of the fleet tears every member down.
    h.publish(&acting("teardown", "f1-down", "f1")).await;
    let events = h.until_terminal("f1-down", 1).await;
    let last = events.last().expect("terminal");
    assert_eq!(last.state, State::Stopped, "{last:#?}");
    assert_eq!(
        last.fleet
            .as_ref()
            .and_then(|f| f.members)
            .map(|c| c.stopped),
        Some(6)
    );
    assert!(h.platform.existing.lock().expect("lock").is_empty());
    assert_eq!(h.record("f1#0").await.state, State::Stopped);
}

/// A worker that may coordinate one fleet at a time leaves the others due on the
/// schedule and takes each in turn: every fleet still ends, none is dropped.
#[tokio::test]
async fn fleets_beyond_a_workers_coordinators_wait_their_turn_and_all_end() {
    let mut h = harness_with(
        1,
        |n| WorkerConfig {
            fleet_coordinators: 1,
            ..config(n)
        },
        |store| store,
    )
    .await;
    for i in 0..4 {
        h.publish(&fleet(&format!("turn-{i}"), 3, "")).await;
    }
    for i in 0..4 {
        let events = h.until_terminal(&format!("turn-{i}"), 1).await;
        assert_eq!(
            events.last().map(|e| e.state),
            Some(State::Running),
            "{events:#?}"
        );
    }
    assert_eq!(h.platform.provisions.load(Ordering::SeqCst), 12);
}

#[tokio::test]
async fn a_fleet_below_its_min_count_is_rolled_back_by_default() {
    let mut h = harness(2).await;
    h.platform
        .answers
        .lock()
        .expect("lock")
        .push_back(Err(PlatformError::permanent(
            ErrorClass::Capacity,
            "no room",
        )));
    h.publish(&fleet("f2", 4, "")).await;
    let events = h.until_terminal("f2", 1).await;
    check_fleet_events(&events, 4);
    let last = events.last().expect("terminal");
    assert_eq!(last.state, State::Error, "{last:#?}");
    let error = last.error.as_ref().expect("error");
    assert_eq!(error.class, ErrorClass::Capacity, "{error:?}");
    assert!(error.message.contains("rollback"), "{error:?}");
    let members = &last.resource.as_ref().expect("resource").members;
    assert!(
        members
            .iter()
            .all(|m| matches!(m.state, State::Stopped | State::Error)),
        "{members:#?}"
    );
    assert!(h.platform.existing.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn a_partial_fleet_is_kept_when_asked_and_succeeds_at_its_min_count() {
    let mut h = harness(2).await;
    let no_room = || Err(PlatformError::permanent(ErrorClass::Capacity, "no room"));
    h.platform
        .answers
        .lock()
        .expect("lock")
        .push_back(no_room());
    h.publish(&fleet("f3", 4, r#","min_count":3"#)).await;
    let last = h.until_terminal("f3", 1).await.pop().expect("terminal");
    assert_eq!(last.state, State::Running, "{last:#?}");
    assert_eq!(
        last.fleet
            .as_ref()
            .and_then(|f| f.members)
            .map(|c| (c.running, c.error)),
        Some((3, 1))
    );

    h.platform
        .answers
        .lock()
        .expect("lock")
        .push_back(no_room());
    h.publish(&fleet("f4", 3, r#","on_partial":"keep""#)).await;
    let last = h.until_terminal("f4", 1).await.pop().expect("terminal");
    assert_eq!(last.state, State::Error, "{last:#?}");
    assert!(last.error.as_ref().expect("error").message.contains("kept"));
    let kept = h
        .platform
        .existing
        .lock()
        .expect("lock")
        .iter()
        .filter(|id| id.starts_with("f4#"))
        .count();
    assert_eq!(kept, 2);
}

#[tokio::test]
async fn a_burst_is_paced_by_the_platforms_bucket_across_workers() {
    let mut h = harness(2).await;
    for i in 0..7 {
        h.publish(&provision(&format!("paced-{i}"), r#","paced":true"#))
            .await;
    }
    for i in 0..7 {
        let last = h
            .until_terminal(&format!("paced-{i}"), 1)
            .await
            .pop()
            .expect("end");
        assert_eq!(last.state, State::Running, "{last:#?}");
    }
    let mut started = h.platform.started.lock().expect("lock").clone();
    started.sort();
    // A burst of two, then one every 200 ms, whichever worker called.
    for (i, at) in started.iter().enumerate().skip(2) {
        let since = *at - started[0];
        let least = Duration::from_millis(200 * (i as u64 - 1)) - Duration::from_millis(30);
        assert!(since >= least, "call {i} came {since:?} after the first");
    }
}

/// A broker that loses the first publish of the requests it is told to.
struct LosingBroker {
    inner: MemoryBroker,
    lose: Mutex<std::collections::HashSet<String>>,
}

#[async_trait]
impl Broker for LosingBroker {
    async fn declare(&self, platform: PlatformName) -> Result<(), provisioner_core::BrokerError> {
        self.inner.declare(platform).await
    }
    async fn consume(
        &self,
        platform: PlatformName,
        prefetch: u16,
    ) -> Result<provisioner_core::broker::DeliveryStream, provisioner_core::BrokerError> {
        self.inner.consume(platform, prefetch).await
    }
    async fn send_status(
        &self,
        event: &StatusEvent,
    ) -> Result<provisioner_core::broker::PendingConfirm, provisioner_core::BrokerError> {
        self.inner.send_status(event).await
    }
    async fn publish_request(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
    ) -> Result<(), provisioner_core::BrokerError> {
        self.inner
            .publish_request(routing_key, request_id, body)
            .await
    }
    async fn publish_derived_request(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
        headers: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), provisioner_core::BrokerError> {
        if self.lose.lock().expect("lose").remove(request_id) {
            return Ok(());
        }
        self.inner
            .publish_derived_request(routing_key, request_id, body, headers)
            .await
    }
    async fn subscribe_status(
        &self,
    ) -> Result<BoxStream<'static, StatusEvent>, provisioner_core::BrokerError> {
        self.inner.subscribe_status().await
    }
}

#[tokio::test]
async fn a_fleet_whose_member_message_was_lost_publishes_it_again_once_nothing_moves() {
    let inner = MemoryBroker::new();
    let broker = Arc::new(LosingBroker {
        inner: inner.clone(),
        lose: Mutex::new(["lossy#2".to_owned()].into()),
    });
    let platform = Arc::new(Scripted::default());
    let mut events = inner.subscribe_status().await.expect("subscribe");
    let worker = Arc::new(Worker::new(
        platform.clone(),
        Arc::new(MemoryStore::new()),
        broker,
        WorkerConfig {
            fleet_stall: Duration::from_millis(1500),
            ..config(0)
        },
    ));
    tokio::spawn(worker.run(std::future::pending()));
    inner
        .publish_request("process.provision", "lossy", &fleet("lossy", 4, ""))
        .await
        .expect("publish");
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let event = events.next().await.expect("events");
            if event.request_id == "lossy" && event.state.is_terminal() {
                return event;
            }
        }
    })
    .await
    .expect("the fleet ended although a member's message was lost");
    assert_eq!(end.state, State::Running, "{end:#?}");
    assert_eq!(
        platform.provisions.load(Ordering::SeqCst),
        4,
        "the lost member made once, the others not again"
    );
}

/// A signing deployment over the in-memory broker, which tells producers' messages from
/// workers' as RabbitMQ does by the exchange: a signed fleet runs whole (the members
/// the worker derives need no producer's signature), an unsigned request is refused,
/// and a retry parked by the worker comes back without being refused for it.
#[tokio::test]
async fn a_signing_worker_runs_signed_requests_and_what_it_derives_and_refuses_the_rest() {
    use provisioner_core::signing::SIGNATURE_HEADER;
    let (keys, mut h) = signing_harness().await;
    let signed = |body: &[u8], routing_key: &str| {
        std::collections::BTreeMap::from([(
            SIGNATURE_HEADER.to_owned(),
            keys.sign(routing_key, body),
        )])
    };
    let fleet = br#"{"schema_version":1,"request_id":"fleet","operation":"provision","platform":"process","count":3,"spec":{"program":"x"}}"#;
    h.broker
        .publish_request_with_headers(
            "process.provision",
            "fleet",
            fleet,
            &signed(fleet, "process.provision"),
        )
        .await
        .expect("publish");
    let ended = h.until_terminal("fleet", 1).await;
    assert_eq!(
        ended.last().map(|e| e.state),
        Some(State::Running),
        "{ended:#?}"
    );
    assert_eq!(
        h.platform.existing.lock().expect("lock").len(),
        3,
        "every member ran"
    );

    // The platform answers "try again" once: the parked copy comes back and runs.
    h.platform
        .answers
        .lock()
        .expect("lock")
        .push_back(Err(PlatformError::transient("later")));
    let again = provision("again", "");
    h.broker
        .publish_request_with_headers(
            "process.provision",
            "again",
            &again,
            &signed(&again, "process.provision"),
        )
        .await
        .expect("publish");
    let ended = h.until_terminal("again", 1).await;
    assert_eq!(ended.last().map(|e| e.state), Some(State::Running));

    h.publish(&provision("unsigned", "")).await;
    let refused = h.until_terminal("unsigned", 1).await;
    let error = refused[0].error.clone().expect("an error");
    assert_eq!(error.class, ErrorClass::Permission, "{refused:#?}");
    assert!(!h.platform.exists("unsigned"));

    // A signature older than the allowed age: refused for a request never accepted
    // (nothing unsigned, not the broker's `redelivered`, waives it), answered by its
    // record for one that ran (a delivery again after a worker died with it).
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    let stale = |body: &[u8]| {
        std::collections::BTreeMap::from([(
            SIGNATURE_HEADER.to_owned(),
            provisioner_core::signing::sign_with(
                "k1",
                b"a-secret-of-at-least-thirty-two-bytes!!",
                "process.provision",
                body,
                two_hours_ago,
            ),
        )])
    };
    let old = provision("old", "");
    h.broker
        .publish_request_with_headers("process.provision", "old", &old, &stale(&old))
        .await
        .expect("publish");
    let refused = h.until_terminal("old", 1).await;
    let error = refused[0].error.clone().expect("an error");
    assert!(error.message.contains("stale"), "{refused:#?}");
    assert!(!h.platform.exists("old"));
    h.broker
        .publish_request_with_headers("process.provision", "again", &again, &stale(&again))
        .await
        .expect("publish");
    let answered = h.until_terminal("again", 1).await;
    assert_eq!(answered[0].state, State::Running, "{answered:#?}");
    assert!(answered[0].rejected_message.is_none(), "{answered:#?}");

    // The workers' own ids and fields, sent by a producer (signed, even): refused, so the
    // expiry, rollback or reconcile that id is kept for still happens.
    for (id, body) in [
        (
            "fleet#expired",
            br#"{"schema_version":1,"request_id":"fleet#expired","operation":"teardown","platform":"process","target_request_id":"fleet"}"#.to_vec(),
        ),
        (
            "caused",
            br#"{"schema_version":1,"request_id":"caused","operation":"teardown","platform":"process","target_request_id":"fleet#0","cause":"expired: trust me"}"#.to_vec(),
        ),
        (
            "member",
            br#"{"schema_version":1,"request_id":"member","operation":"provision","platform":"process","spec":{"program":"x"},"fleet_member":{"fleet_request_id":"fleet","index":7,"count":9}}"#.to_vec(),
        ),
    ] {
        let key = if body.windows(8).any(|w| w == b"teardown") { "process.teardown" } else { "process.provision" };
        h.broker
            .publish_request_with_headers(key, id, &body, &signed(&body, key))
            .await
            .expect("publish");
        let refused = h.until_terminal(id, 1).await;
        let error = refused[0].error.clone().expect("an error");
        assert_eq!(error.class, ErrorClass::InvalidRequest, "{refused:#?}");
        assert!(refused[0].rejected_message.is_some(), "{refused:#?}");
    }
    assert_eq!(
        h.platform.existing.lock().expect("lock").len(),
        4,
        "the fleet's three and `again` still run"
    );
}

/// A holder of the store's credentials (and not of the signing keys) plants fleets and
/// puts them on the coordinators' schedule, as a worker would: unsealed, a real fleet's
/// sealed request moved to another id, and one altered after sealing. A signing worker
/// acts on none of them — no member published, nothing made, no record — and takes
/// them off the schedule; the real fleet it was copied from still ran.
#[tokio::test]
async fn a_signing_worker_acts_on_no_fleet_planted_in_the_store() {
    use provisioner_core::signing::SIGNATURE_HEADER;
    let (keys, mut h) = signing_harness().await;
    let fleet = br#"{"schema_version":1,"request_id":"real","operation":"provision","platform":"process","count":2,"spec":{"program":"x"}}"#;
    let header = std::collections::BTreeMap::from([(
        SIGNATURE_HEADER.to_owned(),
        keys.sign("process.provision", fleet),
    )]);
    h.broker
        .publish_request_with_headers("process.provision", "real", fleet, &header)
        .await
        .expect("publish");
    let ended = h.until_terminal("real", 1).await;
    assert_eq!(ended.last().map(|e| e.state), Some(State::Running));
    let real = h.store.fleet("real").await.expect("read").expect("kept");
    assert!(real.starts_with("sealed-v1 key=k1,"), "{real}");

    let request = |id: &str, count: u32| {
        format!(
            r#"{{"schema_version":1,"request_id":"{id}","operation":"provision","platform":"process","count":{count},"spec":{{"program":"x"}}}}"#
        )
    };
    let planted = [
        ("plain", request("plain", 3)),
        ("moved", real.clone()),
        (
            "altered",
            real.replace("\"count\":2", "\"count\":50")
                .replace("\"real\"", "\"altered\""),
        ),
    ];
    let now = std::time::SystemTime::now();
    for (id, stored) in &planted {
        h.store.put_fleet(id, stored).await.expect("plant");
        h.store
            .schedule_expiry("process/fleets", id, now)
            .await
            .expect("schedule");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !h.memory.scheduled("process/fleets").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the planted fleets were never dropped: {:?}",
            h.memory.scheduled("process/fleets")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (id, _) in &planted {
        assert!(
            h.store.get(id).await.expect("read").is_none(),
            "{id} was claimed"
        );
        let member = format!("{id}#0");
        assert!(
            h.store.get(&member).await.expect("read").is_none(),
            "{member} was published"
        );
        assert!(!h.platform.exists(&member));
    }
    assert_eq!(
        h.platform.existing.lock().expect("lock").len(),
        2,
        "the real fleet's two"
    );

    // A teardown naming a planted fleet ends saying why, instead of retrying for ever or
    // tearing down by what the plant says.
    let down = acting("teardown", "down-plain", "plain");
    let header = std::collections::BTreeMap::from([(
        SIGNATURE_HEADER.to_owned(),
        keys.sign("process.teardown", &down),
    )]);
    h.broker
        .publish_request_with_headers("process.teardown", "down-plain", &down, &header)
        .await
        .expect("publish");
    let ended = h.until_terminal("down-plain", 1).await;
    let error = ended
        .last()
        .and_then(|e| e.error.clone())
        .expect("an error");
    assert_eq!(error.class, ErrorClass::Permission, "{ended:#?}");
    assert!(error.message.contains("not one a worker"), "{error:?}");
}

/// A deployment binding signing keys to tenants: a producer names only its own tenant,
/// and must name it; an operator's key (`*`) names any. What is refused makes nothing.
#[tokio::test]
async fn a_producer_bound_to_a_tenant_spends_only_its_own() {
    use provisioner_core::signing::{SIGNATURE_HEADER, SigningKeys};
    use provisioner_core::tenants::TenantBinding;
    let keys = Arc::new(
        SigningKeys::parse(
            "k1=a-secret-of-at-least-thirty-two-bytes!!,ops=another-secret-of-thirty-two-bytes!!",
            Duration::from_secs(3600),
        )
        .expect("keys"),
    );
    let binding = Arc::new(TenantBinding::parse("key:k1=team-a,key:ops=*").expect("binding"));
    let (signing, tenants) = (keys.clone(), binding.clone());
    let mut h = harness_with(
        1,
        move |n| WorkerConfig {
            signing: Some(signing.clone()),
            tenants: Some(tenants.clone()),
            ..config(n)
        },
        |store| store,
    )
    .await;
    let signed = |key_id: &str, routing_key: &str, body: &[u8]| {
        let secret: &[u8] = if key_id == "k1" {
            b"a-secret-of-at-least-thirty-two-bytes!!"
        } else {
            b"another-secret-of-thirty-two-bytes!!"
        };
        let header = provisioner_core::signing::sign_with(
            key_id,
            secret,
            routing_key,
            body,
            std::time::SystemTime::now(),
        );
        std::collections::BTreeMap::from([(SIGNATURE_HEADER.to_owned(), header)])
    };
    let publish = |id: &'static str, key_id: &'static str, tenant: Option<&str>| {
        let mut request = serde_json::json!({"schema_version": 1, "request_id": id, "operation": "provision", "platform": "process", "spec": {"program": "x"}});
        if let Some(tenant) = tenant {
            request["tenant"] = tenant.into();
        }
        let body = request.to_string().into_bytes();
        let headers = signed(key_id, "process.provision", &body);
        (id, body, headers)
    };
    for (id, body, headers) in [
        publish("other-tenant", "k1", Some("team-b")),
        publish("no-tenant", "k1", None),
    ] {
        h.broker
            .publish_request_with_headers("process.provision", id, &body, &headers)
            .await
            .expect("publish");
        let refused = h.until_terminal(id, 1).await;
        let error = refused[0].error.clone().expect("an error");
        assert_eq!(error.class, ErrorClass::Permission, "{refused:#?}");
        assert!(error.message.contains("team-a"), "{refused:#?}");
        assert!(!h.platform.exists(id));
    }
    for (id, body, headers) in [
        publish("own-tenant", "k1", Some("team-a")),
        publish("operator", "ops", Some("team-z")),
        publish("operator-none", "ops", None),
    ] {
        h.broker
            .publish_request_with_headers("process.provision", id, &body, &headers)
            .await
            .expect("publish");
        let ended = h.until_terminal(id, 1).await;
        assert_eq!(
            ended.last().map(|e| e.state),
            Some(State::Running),
            "{ended:#?}"
        );
    }

    // Acting on a resource: only on its own tenant's. Team A's key may tear down its
    // own provision, not the operator's team-z one, nor one never made.
    let teardown = |id: &'static str, target: &str| {
        let body = serde_json::json!({"schema_version": 1, "request_id": id, "operation": "teardown", "platform": "process", "target_request_id": target, "tenant": "team-a"}).to_string().into_bytes();
        let headers = signed("k1", "process.teardown", &body);
        (id, body, headers)
    };
    for (id, body, headers) in [
        teardown("not-mine", "operator"),
        teardown("never-made", "nothing"),
    ] {
        h.broker
            .publish_request_with_headers("process.teardown", id, &body, &headers)
            .await
            .expect("publish");
        let refused = h.until_terminal(id, 1).await;
        let error = refused[0].error.clone().expect("an error");
        assert_eq!(error.class, ErrorClass::Permission, "{refused:#?}");
        assert!(error.message.contains("not known to be"), "{refused:#?}");
    }
    assert!(
        h.platform.exists("operator"),
        "another tenant's resource stays"
    );
    let (id, body, headers) = teardown("mine", "own-tenant");
    h.broker
        .publish_request_with_headers("process.teardown", id, &body, &headers)
        .await
        .expect("publish");
    let ended = h.until_terminal(id, 1).await;
    assert_eq!(
        ended.last().map(|e| e.state),
        Some(State::Stopped),
        "{ended:#?}"
    );
    assert!(!h.platform.exists("own-tenant"));
    let _ = keys;
    let _ = binding;
}

#[tokio::test]
async fn workers_reconciling_on_their_own_take_turns_and_send_one_teardown() {
    let reconciling = |n| WorkerConfig {
        reconcile: Some((
            Duration::from_millis(100),
            provisioner_core::ReconcileOptions {
                min_age: Duration::ZERO,
                second_look_after: Duration::from_millis(50),
                ..provisioner_core::ReconcileOptions::default()
            },
        )),
        ..config(n)
    };
    let mut h = harness_with(3, reconciling, |store| store).await;
    // A resource with our marks and no record: a worker died right after creating it.
    h.platform
        .existing
        .lock()
        .expect("lock")
        .insert("leak".into());
    let teardown = provisioner_core::reconcile_teardown_id("leak", "id-leak");
    // Many periods of three workers: each would send the teardown on every look while
    // the leak is there, if they did not take turns.
    let mut ends = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(event) = h.events.next().await {
            if event.request_id == teardown && event.state.is_terminal() {
                ends.push(event);
            }
        }
    })
    .await;
    assert_eq!(ends.len(), 1, "{ends:#?}");
    assert_eq!(ends[0].state, State::Stopped, "{ends:#?}");
    assert!(!h.platform.exists("leak"));
}

/// Handles deliveries as the Lambda form does: one `handle` each, no background tasks,
/// so nothing coordinates fleets or sends expiries but [`Worker::keep_house`].
async fn consume_without_background_work(h: &Harness, config: WorkerConfig) -> Arc<Worker> {
    let worker = Arc::new(Worker::new(
        h.platform.clone(),
        h.store.clone(),
        Arc::new(h.broker.clone()),
        config,
    ));
    let mut deliveries = h
        .broker
        .consume(PlatformName::Process, 16)
        .await
        .expect("consume");
    let handler = worker.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = deliveries.next().await {
            let handler = handler.clone();
            tokio::spawn(async move { handler.handle(delivery).await });
        }
    });
    worker
}

#[tokio::test]
async fn rounds_of_housekeeping_coordinate_a_fleet_handing_it_on_between_them() {
    let mut h = harness(0).await;
    h.platform.provision_ms.store(1500, Ordering::SeqCst);
    let worker = consume_without_background_work(&h, config(0)).await;
    let quiet_round = tokio::time::Instant::now();
    let nothing = worker
        .keep_house(tokio::time::Instant::now() + Duration::from_secs(10))
        .await;
    assert_eq!(nothing, provisioner_core::Housekeeping::default());
    assert!(
        quiet_round.elapsed() < Duration::from_secs(2),
        "a round with nothing to do returns at once"
    );

    h.publish(&fleet("f-rounds", 4, "")).await;
    // The members run meanwhile (1.5 s each); rounds too short to see them end take the
    // fleet (once it is on the schedule) and hand it on.
    let mut rounds = 0;
    loop {
        let short = tokio::time::Instant::now();
        let round = worker
            .keep_house(tokio::time::Instant::now() + Duration::from_millis(150))
            .await;
        rounds += 1;
        assert!(short.elapsed() < Duration::from_secs(1), "ends on time");
        if round.fleets == 1 {
            break;
        }
        // Nothing due yet: that round answered at once.
        assert!(rounds < 100, "the fleet never came on the schedule");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(h.record("f-rounds").await.result.is_none(), "not ended yet");

    while h.record("f-rounds").await.result.is_none() {
        assert!(rounds < 40, "the fleet never ended");
        worker
            .keep_house(tokio::time::Instant::now() + Duration::from_millis(150))
            .await;
        rounds += 1;
    }
    let events = h.until_terminal("f-rounds", 1).await;
    check_fleet_events(&events, 4);
    let last = events.last().expect("terminal");
    assert_eq!(last.state, State::Running, "{last:#?}");
    assert_eq!(last.resource.as_ref().expect("members").members.len(), 4);
    // Hand-overs are not failed attempts: the fleet was never taken for abandoned.
    assert_eq!(h.record("f-rounds").await.attempts, 1, "{rounds} rounds");
    assert_eq!(h.platform.provisions.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_round_of_housekeeping_sends_the_teardown_of_what_expired() {
    let mut h = harness(0).await;
    let worker = consume_without_background_work(&h, config(0)).await;
    h.publish(br#"{"schema_version":1,"request_id":"short-lived","operation":"provision","platform":"process","ttl_seconds":1,"spec":{"program":"x"}}"#)
        .await;
    let events = h.until_terminal("short-lived", 1).await;
    assert_eq!(events.last().expect("running").state, State::Running);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let round = worker
        .keep_house(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert_eq!(round.expired, 1, "{round:?}");
    let teardown = provisioner_core::expiry_teardown_id("short-lived");
    let ends = h.until_terminal(&teardown, 1).await;
    assert_eq!(ends.last().expect("stopped").state, State::Stopped);
    assert!(!h.platform.exists("short-lived"));
    // Sent once: the next round finds nothing due.
    let again = worker
        .keep_house(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert_eq!(again.expired, 0, "{again:?}");
}

#[tokio::test]
async fn a_teardown_ends_a_provision_still_waiting_for_its_rate_limit_turn_at_once() {
    let mut h = harness(1).await;
    h.publish(&provision("first-turn", r#","slowly_paced":true"#))
        .await;
    h.publish(&provision("next-turn", r#","slowly_paced":true"#))
        .await;
    let first = h.until_terminal("first-turn", 1).await;
    assert_eq!(first.last().expect("end").state, State::Running);
    // "next-turn" now waits about 4 s for its token, under its lease.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let torn_down_at = tokio::time::Instant::now();
    h.publish(&acting("teardown", "next-turn-down", "next-turn"))
        .await;
    let ended = h.until_terminal("next-turn", 1).await;
    let last = ended.last().expect("end");
    assert_eq!(last.state, State::Error, "{last:#?}");
    assert!(
        torn_down_at.elapsed() < Duration::from_millis(2500),
        "ended {:?} after the teardown: it waited out its turn",
        torn_down_at.elapsed()
    );
    assert_eq!(
        h.platform.provisions.load(Ordering::SeqCst),
        1,
        "the platform was never called for it"
    );
    let down = h.until_terminal("next-turn-down", 1).await;
    assert_eq!(down.last().expect("end").state, State::Stopped);
}

#[tokio::test]
async fn rounds_of_housekeeping_roll_a_fleet_back_with_one_teardown_a_member() {
    let mut h = harness(0).await;
    h.platform.provision_ms.store(1500, Ordering::SeqCst);
    // Teardowns take a while, so a rollback spans several rounds.
    h.platform.teardown_ms.store(1000, Ordering::SeqCst);
    h.platform
        .answers
        .lock()
        .expect("lock")
        .push_back(Err(PlatformError::permanent(
            ErrorClass::Capacity,
            "no room",
        )));
    let worker = consume_without_background_work(&h, config(0)).await;
    h.publish(&fleet("f-back", 4, "")).await;
    let mut rounds = 0;
    let ended = |h: &Harness| {
        let store = h.store.clone();
        async move {
            let record = store.get("f-back").await.expect("get");
            record.is_some_and(|r| r.result.is_some())
        }
    };
    while !ended(&h).await {
        assert!(rounds < 100, "the fleet never ended");
        worker
            .keep_house(tokio::time::Instant::now() + Duration::from_millis(150))
            .await;
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every event so far: each rollback teardown ended once, however many coordinators
    // the fleet had (a second copy would be answered again from its record).
    let mut seen = Vec::new();
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(500), h.events.next()).await
    {
        seen.push(event);
    }
    let mut ends: std::collections::BTreeMap<String, usize> = Default::default();
    for event in &seen {
        if event.request_id.ends_with(".rollback") && event.state.is_terminal() {
            *ends.entry(event.request_id.clone()).or_default() += 1;
        }
    }
    // One per member, the failed one too: its removal may have failed, and the fleet's
    // end says every member was torn down.
    assert_eq!(ends.len(), 4, "{rounds} rounds: {ends:?}");
    assert!(ends.values().all(|n| *n == 1), "{rounds} rounds: {ends:?}");
    assert!(h.platform.existing.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn a_fleet_taken_over_after_a_crash_republishes_its_members_once_not_at_every_hand_over() {
    let h = harness(0).await;
    let worker = Arc::new(Worker::new(
        h.platform.clone(),
        h.store.clone(),
        Arc::new(h.broker.clone()),
        config(0),
    ));
    let body = fleet("f-crash", 3, "");
    h.publish(&body).await;
    // One worker takes the fleet's message and hands the fleet off: its 3 members are
    // queued, and no worker consumes them in this test.
    {
        let mut deliveries = h
            .broker
            .consume(PlatformName::Process, 1)
            .await
            .expect("consume");
        let delivery = deliveries.next().await.expect("the fleet").expect("ok");
        worker.handle(delivery).await;
    }
    // A coordinator claimed it and died.
    let hash = provisioner_events::decode_request(&body)
        .expect("request")
        .payload_hash();
    let claim = h
        .store
        .claim(claim_request(
            "f-crash",
            &hash,
            "crashed",
            Duration::from_millis(100),
        ))
        .await
        .expect("claim");
    assert!(matches!(claim, Claim::Claimed { .. }), "{claim:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The next coordinator publishes the members again (they have no record: their
    // first messages may be lost); the ones after a hand-over do not.
    for _ in 0..3 {
        worker
            .keep_house(tokio::time::Instant::now() + Duration::from_millis(150))
            .await;
    }
    let mut queued = 0;
    let mut deliveries = h
        .broker
        .consume(PlatformName::Process, 1)
        .await
        .expect("consume");
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(Duration::from_millis(300), deliveries.next()).await
    {
        queued += 1;
    }
    assert_eq!(queued, 6, "3 members, published once more after the crash");
}

#[tokio::test]
async fn a_coordinator_that_finds_its_fleet_ended_publishes_the_end_before_it_drops_the_fleet() {
    // Issue 25, hole 2: the coordinator that recorded the fleet's end died before it
    // published it. The next one finds the record ended: it publishes the end in its
    // round, then takes the fleet off the schedule (not leaving the end to the outbox,
    // which has it only a minute later).
    let mut h = harness(0).await;
    let worker = consume_without_background_work(&h, config(0)).await;
    let body = fleet("f-done", 2, "");
    let request = provisioner_events::decode_request(&body).expect("a fleet");
    let Claim::Claimed { fence, seq, .. } = h
        .store
        .claim(ClaimRequest {
            request_id: "f-done",
            payload_hash: &request.payload_hash(),
            owner: "the-dead-one",
            nonce: "n1",
            lease: Duration::from_secs(30),
            working_state: State::Starting,
            routing_key: "process.provision",
        })
        .await
        .expect("claim")
    else {
        panic!("a fresh record is claimed");
    };
    h.store
        .put_fleet("f-done", std::str::from_utf8(&body).expect("utf-8"))
        .await
        .expect("keep the fleet");
    let end = StatusEvent {
        schema_version: provisioner_events::SCHEMA_VERSION,
        request_id: "f-done".into(),
        operation: Some(provisioner_events::Operation::Provision),
        platform: "process".into(),
        state: State::Error,
        seq: seq + 1,
        attempt: 1,
        timestamp: time::OffsetDateTime::now_utc(),
        resource: None,
        error: Some(provisioner_events::ErrorInfo {
            class: ErrorClass::Capacity,
            message: "no member could run; nothing was kept".into(),
        }),
        tenant: None,
        rejected_message: None,
        cause: None,
        fleet: None,
    };
    h.store
        .complete("f-done", &fence, &end)
        .await
        .expect("complete");
    let schedule = provisioner_core::runtime::fleet_schedule(PlatformName::Process);
    h.store
        .schedule_expiry(&schedule, "f-done", SystemTime::now())
        .await
        .expect("on the schedule");
    worker
        .keep_house(tokio::time::Instant::now() + Duration::from_secs(2))
        .await;
    let published = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let event = h.events.next().await.expect("events");
            if event.request_id == "f-done" {
                return event;
            }
        }
    })
    .await
    .expect("the round published the fleet's end");
    assert_eq!(published, end);
    assert!(
        h.memory.scheduled(&schedule).is_empty(),
        "taken off the schedule once published"
    );
    assert!(
        h.memory
            .scheduled(&provisioner_core::runtime::ends_outbox(
                PlatformName::Process
            ))
            .is_empty(),
        "and off the outbox: not published a second time a minute later"
    );
}
