//! One conformance suite for every [`StateStore`]: the in-memory one and Redis (the
//! `_on_redis` tests need the server at `REDIS_URL`, default 127.0.0.1:6379, which the
//! README's test command starts).

use std::sync::Arc;
use std::time::Duration;

use provisioner_core::redis_store::RedisStore;
use provisioner_core::store::{Claim, ClaimRequest, MemoryStore, StateStore, StoreError};
use provisioner_events::{SCHEMA_VERSION, State, StatusEvent};

fn claim<'a>(id: &'a str, hash: &'a str, owner: &'a str, lease_ms: u64) -> ClaimRequest<'a> {
    ClaimRequest {
        request_id: id,
        payload_hash: hash,
        owner,
        lease: Duration::from_millis(lease_ms),
        working_state: State::Starting,
    }
}

fn terminal(id: &str, seq: u64) -> StatusEvent {
    StatusEvent {
        schema_version: SCHEMA_VERSION,
        request_id: id.into(),
        operation: Some(provisioner_events::Operation::Provision),
        platform: "docker".into(),
        state: State::Running,
        seq,
        attempt: 1,
        timestamp: time::OffsetDateTime::now_utc(),
        resource: None,
        error: None,
        tenant: None,
    }
}

async fn conformance(store: Arc<dyn StateStore>) {
    // A new request is claimed with fence 1 and seq 0.
    let first = store
        .claim(claim("r1", "h", "a", 60_000))
        .await
        .expect("claim");
    assert_eq!(
        first,
        Claim::Claimed {
            fence: 1,
            seq: 0,
            takeover: false
        }
    );
    // A live lease is held against everyone, the same owner included (a duplicate delivery).
    for owner in ["b", "a"] {
        match store
            .claim(claim("r1", "h", owner, 60_000))
            .await
            .expect("claim")
        {
            Claim::Held { remaining, owner } => {
                assert!(remaining > Duration::from_secs(50), "{remaining:?}");
                assert_eq!(owner, "a");
            }
            other => panic!("expected held, got {other:?}"),
        }
    }
    // A different payload under the same id is a conflict, whatever the state.
    assert_eq!(
        store
            .claim(claim("r1", "other", "b", 1000))
            .await
            .expect("claim"),
        Claim::Conflict
    );
    // Sequence numbers increase for the holder only.
    assert_eq!(store.next_seq("r1", 1).await.expect("seq"), 1);
    assert_eq!(store.next_seq("r1", 1).await.expect("seq"), 2);
    assert!(matches!(
        store.next_seq("r1", 7).await,
        Err(StoreError::Fenced(7))
    ));
    // Release lets the next claim take over at once with a new token; the old one is fenced off.
    store.release("r1", 1).await.expect("release");
    assert_eq!(
        store
            .claim(claim("r1", "h", "b", 60_000))
            .await
            .expect("claim"),
        Claim::Claimed {
            fence: 2,
            seq: 2,
            takeover: true
        }
    );
    assert!(matches!(
        store.renew("r1", 1, Duration::from_secs(5)).await,
        Err(StoreError::Fenced(1))
    ));
    assert!(matches!(
        store.complete("r1", 1, &terminal("r1", 9)).await,
        Err(StoreError::Fenced(1))
    ));
    store
        .renew("r1", 2, Duration::from_secs(60))
        .await
        .expect("renew");
    assert_eq!(
        store.next_seq("r1", 2).await.expect("seq"),
        3,
        "seq continues across holders"
    );
    // Completion is stored and answered to every later claim.
    let done = terminal("r1", 3);
    store.complete("r1", 2, &done).await.expect("complete");
    for owner in ["c", "b"] {
        assert_eq!(
            store
                .claim(claim("r1", "h", owner, 1000))
                .await
                .expect("claim"),
            Claim::Done(Box::new(done.clone()))
        );
    }
    assert_eq!(
        store
            .claim(claim("r1", "x", "c", 1000))
            .await
            .expect("claim"),
        Claim::Conflict
    );
    let record = store.get("r1").await.expect("get").expect("record");
    assert_eq!(record.state, State::Running);
    assert_eq!((record.fence, record.seq), (2, 3));
    assert_eq!(record.result, Some(done.clone()));
    assert_eq!(record.owner, None);
    // A teardown marks it stopped; the stored answer stays what the request got.
    let mut stopped = terminal("r1-down", 2);
    stopped.state = State::Stopped;
    store
        .mark_resource_state("r1", stopped.state)
        .await
        .expect("mark");
    assert_eq!(
        store.get("r1").await.expect("get").expect("record").state,
        State::Stopped
    );
    store
        .mark_resource_state("never-made", stopped.state)
        .await
        .expect("mark of unknown is harmless");
    assert_eq!(store.get("never-made").await.expect("get"), None);

    // An expired lease (the holder died) is taken over with a new fencing token.
    assert_eq!(
        store
            .claim(claim("r2", "h", "a", 150))
            .await
            .expect("claim"),
        Claim::Claimed {
            fence: 1,
            seq: 0,
            takeover: false
        }
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store
            .claim(claim("r2", "h", "b", 60_000))
            .await
            .expect("claim"),
        Claim::Claimed {
            fence: 2,
            seq: 0,
            takeover: true
        }
    );
    assert!(matches!(
        store.next_seq("r2", 1).await,
        Err(StoreError::Fenced(1))
    ));
    let record = store.get("r2").await.expect("get").expect("record");
    assert_eq!(record.owner.as_deref(), Some("b"));
    assert!(record.lease_remaining.is_some());
}

async fn racing_claims(store: Arc<dyn StateStore>, id: &str) {
    let mut tasks = Vec::new();
    for n in 0..16 {
        let store = store.clone();
        let id = id.to_owned();
        tasks.push(tokio::spawn(async move {
            store
                .claim(claim(&id, "h", &format!("w{n}"), 60_000))
                .await
                .expect("claim")
        }));
    }
    let mut claimed = 0;
    for task in tasks {
        if matches!(task.await.expect("join"), Claim::Claimed { .. }) {
            claimed += 1;
        }
    }
    assert_eq!(claimed, 1, "exactly one of 16 racing claims wins");
}

#[tokio::test]
async fn memory_store_conforms() {
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    conformance(store.clone()).await;
    racing_claims(store, "race").await;
}

async fn redis_store() -> Arc<dyn StateStore> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    Arc::new(
        RedisStore::connect(&url, &prefix, Duration::from_secs(600))
            .await
            .expect("Redis must be running (the README's test command starts it)"),
    )
}

#[tokio::test]
async fn redis_store_conforms_on_redis() {
    let store = redis_store().await;
    conformance(store.clone()).await;
    racing_claims(store, "race").await;
}

#[tokio::test]
async fn an_unreachable_redis_is_reported_as_unavailable_on_redis() {
    // A port nothing listens on: the error must be the retryable kind.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let error = RedisStore::connect(
        &format!("redis://127.0.0.1:{port}"),
        "x:",
        Duration::from_secs(1),
    )
    .await
    .expect_err("nothing listens");
    assert!(error.is_unavailable(), "{error:?}");
}
