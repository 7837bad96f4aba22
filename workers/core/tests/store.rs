//! One conformance suite for every [`StateStore`]: the in-memory one and Redis (the
//! `_on_redis` tests need the server at `REDIS_URL`, default 127.0.0.1:6379, which the
//! README's test command starts).

use std::sync::Arc;
use std::time::Duration;

use provisioner_core::redis_store::RedisStore;
use provisioner_core::store::{
    Actor, Claim, ClaimRequest, Fence, MemoryStore, Release, Renewal, StateStore, StoreError,
    TargetGrant,
};
use provisioner_events::{PlatformName, SCHEMA_VERSION, State, StatusEvent};

fn claim<'a>(
    id: &'a str,
    hash: &'a str,
    owner: &'a str,
    nonce: &'a str,
    lease_ms: u64,
) -> ClaimRequest<'a> {
    ClaimRequest {
        request_id: id,
        payload_hash: hash,
        owner,
        nonce,
        lease: Duration::from_millis(lease_ms),
        working_state: State::Starting,
        routing_key: "docker.provision",
    }
}

fn terminal(id: &str, seq: u64, state: State) -> StatusEvent {
    StatusEvent {
        schema_version: SCHEMA_VERSION,
        request_id: id.into(),
        operation: Some(provisioner_events::Operation::Provision),
        platform: "docker".into(),
        state,
        seq,
        attempt: 1,
        timestamp: time::OffsetDateTime::now_utc(),
        resource: None,
        error: (state == State::Error).then(|| provisioner_events::ErrorInfo {
            class: provisioner_events::ErrorClass::Conflict,
            message: "torn down".into(),
        }),
        tenant: None,
        rejected_message: None,
        cause: None,
        fleet: None,
    }
}

fn fence(counter: u64, nonce: &str) -> Fence {
    Fence {
        counter,
        nonce: nonce.into(),
    }
}

/// Claims, expecting a claim, and returns (fence, seq, attempt, takeover, tombstone).
async fn claimed(
    store: &dyn StateStore,
    request: ClaimRequest<'_>,
) -> (Fence, u64, u32, bool, Option<String>) {
    match store.claim(request).await.expect("claim") {
        Claim::Claimed {
            fence,
            seq,
            attempt,
            takeover,
            torn_down_by,
            ..
        } => (fence, seq, attempt, takeover, torn_down_by),
        other => panic!("expected a claim, got {other:?}"),
    }
}

/// Claims, expecting a claim, and returns (fence, seq, attempt, takeover, handed_over).
async fn claimed_after(
    store: &dyn StateStore,
    request: ClaimRequest<'_>,
) -> (Fence, u64, u32, bool, bool) {
    match store.claim(request).await.expect("claim") {
        Claim::Claimed {
            fence,
            seq,
            attempt,
            takeover,
            handed_over,
            ..
        } => (fence, seq, attempt, takeover, handed_over),
        other => panic!("expected a claim, got {other:?}"),
    }
}

/// Reserves quota for `id` as its holder: claims it first (the same claim each time, so a
/// request asking again is the same holder).
async fn reserve(
    store: &dyn StateStore,
    tenant: &str,
    id: &str,
    cost: &provisioner_core::QuotaCost,
) -> Result<provisioner_core::QuotaGrant, StoreError> {
    let nonce = format!("quota-{id}");
    let (fence, ..) = claimed(store, claim(id, "h", "w", &nonce, 60_000)).await;
    store.reserve_quota(tenant, id, &fence, cost).await
}

async fn claims_leases_and_fences(store: &dyn StateStore) {
    // A new request: fence 1, the first attempt, seq 1 reserved for the working event.
    let (f1, seq, attempt, takeover, _) = claimed(store, claim("r1", "h", "a", "n1", 60_000)).await;
    assert_eq!(
        (f1.clone(), seq, attempt, takeover),
        (fence(1, "n1"), 1, 1, false)
    );
    // The same claim sent again (its reply was lost on the way) is answered the same,
    // counting and reserving nothing more.
    let again = claimed(store, claim("r1", "h", "a", "n1", 60_000)).await;
    assert_eq!(
        (again.0, again.1, again.2, again.3),
        (fence(1, "n1"), 1, 1, false)
    );
    // A live lease is held against everyone, the same owner included (a duplicate delivery).
    for owner in ["b", "a"] {
        match store
            .claim(claim("r1", "h", owner, "nx", 60_000))
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
            .claim(claim("r1", "other", "b", "ny", 1000))
            .await
            .expect("claim"),
        Claim::Conflict
    );
    // Renewal is for the holder only: the counter alone is not enough, the nonce must match.
    assert_eq!(
        store
            .renew("r1", &f1, Duration::from_secs(60))
            .await
            .expect("renew"),
        Renewal::Renewed
    );
    assert!(matches!(
        store
            .renew("r1", &fence(1, "someone-else"), Duration::from_secs(5))
            .await,
        Err(StoreError::Fenced(_))
    ));
    // Release lets the next claim take over at once; the attempt and seq go on.
    store
        .release("r1", &f1, Release::Failed)
        .await
        .expect("release");
    let (f2, seq, attempt, takeover, handed_over) =
        claimed_after(store, claim("r1", "h", "b", "n2", 60_000)).await;
    assert_eq!(
        (f2.clone(), seq, attempt, takeover, handed_over),
        (fence(2, "n2"), 2, 2, true, false)
    );
    assert!(matches!(
        store.renew("r1", &f1, Duration::from_secs(5)).await,
        Err(StoreError::Fenced(_))
    ));
    assert!(matches!(
        store
            .complete("r1", &f1, &terminal("r1", 9, State::Running))
            .await,
        Err(StoreError::Fenced(_))
    ));
    // A refunded claim does not count: the next one is the same attempt again, and hears
    // that the claim was handed over in good order (a release without refund was not).
    store
        .release("r1", &f2, Release::HandedOver)
        .await
        .expect("release");
    let (f3, _, attempt, _, handed_over) =
        claimed_after(store, claim("r1", "h", "b", "n3", 60_000)).await;
    assert_eq!(attempt, 2, "a refunded claim is not an attempt");
    assert!(handed_over, "released with a refund");
    // An attempt that failed before it sent anything counts, and gives its number back.
    let before = store.get("r1").await.expect("get").expect("record");
    store
        .release("r1", &f3, Release::FailedUnsent)
        .await
        .expect("release");
    let (f3, seq, attempt, _, handed_over) =
        claimed_after(store, claim("r1", "h", "b", "n3a", 60_000)).await;
    assert_eq!((seq, attempt), (before.seq, before.attempts + 1));
    assert!(!handed_over, "a failure is in doubt");
    // A claim given back untried refunds its status number too: the next claim takes it
    // again, so the request's events are numbered without a gap.
    let before = store.get("r1").await.expect("get").expect("record");
    store
        .release("r1", &f3, Release::Untried)
        .await
        .expect("release");
    let (f3, seq, attempt, _, handed_over) =
        claimed_after(store, claim("r1", "h", "b", "n3b", 60_000)).await;
    assert_eq!(
        (seq, attempt),
        (before.seq, before.attempts),
        "number and attempt given back"
    );
    assert!(handed_over, "nothing was in doubt");
    // Completion is stored, with its seq, and answered to every later claim.
    let done = terminal("r1", 5, State::Running);
    store.complete("r1", &f3, &done).await.expect("complete");
    for owner in ["c", "b"] {
        assert_eq!(
            store
                .claim(claim("r1", "h", owner, "n4", 1000))
                .await
                .expect("claim"),
            Claim::Done(Box::new(done.clone()))
        );
    }
    assert_eq!(
        store
            .claim(claim("r1", "x", "c", "n5", 1000))
            .await
            .expect("claim"),
        Claim::Conflict
    );
    let record = store.get("r1").await.expect("get").expect("record");
    assert_eq!(record.state, State::Running);
    assert_eq!((record.fence, record.seq, record.attempts), (5, 5, 3));
    assert_eq!(record.result, Some(done.clone()));
    assert_eq!(record.owner, None);

    // An expired lease (the holder died) is taken over with a new fence; the mark of an
    // earlier hand-over is the last holder's only, not this one's.
    let (handing, ..) = claimed(store, claim("r2", "h", "a", "handing", 60_000)).await;
    store
        .release("r2", &handing, Release::HandedOver)
        .await
        .expect("release");
    let (old, ..) = claimed(store, claim("r2", "h", "a", "old", 150)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (new, seq, attempt, takeover, handed_over) =
        claimed_after(store, claim("r2", "h", "b", "new", 60_000)).await;
    assert_eq!((new.counter, seq, attempt, takeover), (3, 3, 2, true));
    assert!(!handed_over, "the holder before died");
    assert!(matches!(
        store.renew("r2", &old, Duration::from_secs(5)).await,
        Err(StoreError::Fenced(_))
    ));
    let record = store.get("r2").await.expect("get").expect("record");
    assert_eq!(record.owner.as_deref(), Some("b"));
    assert!(record.lease_remaining.is_some());
}

async fn a_teardown_tombstones_its_target_whatever_the_interleaving(store: &dyn StateStore) {
    let lease = Duration::from_secs(60);
    let teardown = Actor {
        request_id: "t-down",
        nonce: "tn",
    };
    // The target never arrived yet: the tombstone makes its record; its provision, when
    // it comes, is told it was torn down (and holds the claim only to end it).
    assert_eq!(
        store
            .act_on("t0", teardown, lease, true)
            .await
            .expect("act"),
        TargetGrant::Granted
    );
    let (f, _, _, _, tombstone) = claimed(store, claim("t0", "h", "a", "p0", 60_000)).await;
    assert_eq!(tombstone.as_deref(), Some("t-down"));
    assert!(
        matches!(
            store.complete("t0", &f, &terminal("t0", 2, State::Running)).await,
            Err(StoreError::TornDown(by)) if by == "t-down"
        ),
        "a tombstoned provision may not end running"
    );
    store
        .complete("t0", &f, &terminal("t0", 2, State::Error))
        .await
        .expect("it may end in error");
    // A tombstone stops provisions only: a teardown named as another's target ends as it
    // ends.
    assert_eq!(
        store
            .act_on("td", teardown, lease, true)
            .await
            .expect("act"),
        TargetGrant::Granted
    );
    let mut down = claim("td", "h", "a", "pd", 60_000);
    down.routing_key = "docker.teardown";
    let (f, ..) = claimed(store, down).await;
    store
        .complete("td", &f, &terminal("td", 2, State::Stopped))
        .await
        .expect("a teardown's end is not refused for a tombstone");
    store
        .end_act("t0", teardown, Some(State::Stopped))
        .await
        .expect("end");

    // The target is being provisioned: the teardown waits, but its tombstone is in place
    // at once, so the provision hears at its next renewal that it must stop.
    let (f, ..) = claimed(store, claim("t1", "h", "a", "p1", 60_000)).await;
    let actor = Actor {
        request_id: "t1-down",
        nonce: "tn1",
    };
    match store.act_on("t1", actor, lease, true).await.expect("act") {
        TargetGrant::Busy { remaining, by } => {
            assert!(remaining > Duration::from_secs(50));
            assert_eq!(by, "a");
        }
        other => panic!("expected busy, got {other:?}"),
    }
    assert_eq!(
        store.renew("t1", &f, lease).await.expect("renew"),
        Renewal::Cancelled {
            by: "t1-down".into()
        }
    );
    store
        .complete("t1", &f, &terminal("t1", 2, State::Error))
        .await
        .expect("complete");
    assert_eq!(
        store.act_on("t1", actor, lease, true).await.expect("act"),
        TargetGrant::Granted
    );
    let record = store.get("t1").await.expect("get").expect("record");
    assert_eq!(record.torn_down_by.as_deref(), Some("t1-down"));
    assert_eq!(record.actor.as_deref(), Some("t1-down"));
    // A teardown that failed lifts its tombstone, and only its own.
    store
        .lift_tombstone("t1", "someone-else")
        .await
        .expect("lift");
    let record = store.get("t1").await.expect("get").expect("record");
    assert_eq!(record.torn_down_by.as_deref(), Some("t1-down"));
    store.lift_tombstone("t1", "t1-down").await.expect("lift");
    let record = store.get("t1").await.expect("get").expect("record");
    assert_eq!(record.torn_down_by, None);

    // Two teardowns tombstone one target; the first fails and lifts its part after the
    // second removed the resource: the tombstone stays, the second's, so a copy of the
    // provision coming again never runs past the second's `stopped` (a kept simulator
    // seed). It goes with the last part lifted.
    let (f, ..) = claimed(store, claim("tj", "h", "a", "pj", 60_000)).await;
    let first = Actor {
        request_id: "tj-down-1",
        nonce: "tf1",
    };
    let second = Actor {
        request_id: "tj-down-2",
        nonce: "tf2",
    };
    for actor in [first, second, second] {
        assert!(matches!(
            store.act_on("tj", actor, lease, true).await.expect("act"),
            TargetGrant::Busy { .. }
        ));
    }
    store
        .complete("tj", &f, &terminal("tj", 2, State::Error))
        .await
        .expect("complete");
    assert_eq!(
        store.act_on("tj", second, lease, true).await.expect("act"),
        TargetGrant::Granted
    );
    store
        .end_act("tj", second, Some(State::Stopped))
        .await
        .expect("end");
    store.lift_tombstone("tj", "tj-down-1").await.expect("lift");
    let record = store.get("tj").await.expect("get").expect("record");
    assert_eq!(record.torn_down_by.as_deref(), Some("tj-down-2"));
    store.lift_tombstone("tj", "tj-down-1").await.expect("lift");
    assert_eq!(
        store
            .get("tj")
            .await
            .expect("get")
            .expect("record")
            .torn_down_by
            .as_deref(),
        Some("tj-down-2"),
        "a part lifted twice is lifted once"
    );
    store.lift_tombstone("tj", "tj-down-2").await.expect("lift");
    assert_eq!(
        store
            .get("tj")
            .await
            .expect("get")
            .expect("record")
            .torn_down_by,
        None
    );

    // Between retries (lease released) the provision is not held: the teardown goes
    // ahead, and the provision's next claim finds the tombstone.
    let (f, ..) = claimed(store, claim("t2", "h", "a", "p2", 60_000)).await;
    store
        .release("t2", &f, Release::Failed)
        .await
        .expect("release");
    let actor2 = Actor {
        request_id: "t2-down",
        nonce: "tn2",
    };
    assert_eq!(
        store.act_on("t2", actor2, lease, true).await.expect("act"),
        TargetGrant::Granted
    );
    let (_, _, _, _, tombstone) = claimed(store, claim("t2", "h", "b", "p3", 60_000)).await;
    assert_eq!(tombstone.as_deref(), Some("t2-down"));

    // A claimed teardown's own record keeps what it tombstoned, busy or granted: once
    // the resource is gone, that is the only place its owner is still known.
    claimed(store, claim("t4", "h", "a", "p6", 60_000)).await;
    claimed(store, claim("t4-down", "h", "d", "p7", 60_000)).await;
    let actor4 = Actor {
        request_id: "t4-down",
        nonce: "tn4",
    };
    assert!(matches!(
        store.act_on("t4", actor4, lease, true).await.expect("act"),
        TargetGrant::Busy { .. }
    ));
    let own = store.get("t4-down").await.expect("get").expect("record");
    assert_eq!(own.acts_on.as_deref(), Some("t4"));
    // An actor that has not claimed itself gets no record from it.
    let unclaimed = Actor {
        request_id: "t5-down",
        nonce: "tn5",
    };
    store
        .act_on("t5", unclaimed, lease, true)
        .await
        .expect("act");
    assert_eq!(store.get("t5-down").await.expect("get"), None);

    // Two requests acting on one finished resource take turns (a stop and a start).
    let (f, ..) = claimed(store, claim("t3", "h", "a", "p4", 60_000)).await;
    store
        .complete("t3", &f, &terminal("t3", 2, State::Running))
        .await
        .expect("complete");
    let stop = Actor {
        request_id: "t3-stop",
        nonce: "s",
    };
    let start = Actor {
        request_id: "t3-start",
        nonce: "g",
    };
    assert_eq!(
        store.act_on("t3", stop, lease, false).await.expect("act"),
        TargetGrant::Granted
    );
    assert!(matches!(
        store.act_on("t3", start, lease, false).await.expect("act"),
        TargetGrant::Busy { by, .. } if by == "t3-stop"
    ));
    store.renew_act("t3", stop, lease).await.expect("renew act");
    assert!(store.renew_act("t3", start, lease).await.is_err());
    store
        .end_act("t3", stop, Some(State::Stopped))
        .await
        .expect("end");
    assert_eq!(
        store.get("t3").await.expect("get").expect("record").state,
        State::Stopped
    );
    assert_eq!(
        store.act_on("t3", start, lease, false).await.expect("act"),
        TargetGrant::Granted
    );
    // A provision of a target being stopped waits for the stop (a duplicate of a finished
    // one is answered at once).
    assert!(matches!(
        store
            .claim(claim("t3", "h", "c", "p5", 1000))
            .await
            .expect("claim"),
        Claim::Done(_)
    ));
}

async fn abandoned_records_are_found_and_taken_over_once(store: &dyn StateStore) {
    // Another platform's backlog of abandoned records, older than this platform's and
    // many times a page of the scan, must not hide it.
    for i in 0..250 {
        let id = format!("backlog-{i}");
        let mut other = claim(&id, "h", "dead", "b", 100);
        other.routing_key = "aws-ecs.provision";
        claimed(store, other).await;
    }
    claimed(store, claim("s1", "h", "dead", "d1", 100)).await;
    let mut other = claim("s2", "h", "dead", "d2", 100);
    other.routing_key = "aws-ec2.provision";
    claimed(store, other).await;
    let (live, ..) = claimed(store, claim("s3", "h", "alive", "d3", 60_000)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let idle = Duration::from_millis(200);
    assert_eq!(
        store.stale("docker", idle, 10).await.expect("stale"),
        vec!["s1".to_owned()],
        "only this platform's records whose lease ended long enough ago"
    );
    let reaped = store
        .reap("s1", idle, "reaper", "r1", Duration::from_secs(60))
        .await
        .expect("reap")
        .expect("stale");
    assert_eq!(reaped.routing_key, "docker.provision");
    assert_eq!(reaped.attempts, 1);
    assert!(
        store
            .reap("s1", idle, "reaper-2", "r2", Duration::from_secs(60))
            .await
            .expect("reap")
            .is_none(),
        "a record is reaped once"
    );
    let mut end = terminal("s1", reaped.seq, State::Error);
    end.seq = reaped.seq;
    store
        .complete("s1", &reaped.fence, &end)
        .await
        .expect("complete");
    assert!(
        store
            .stale("docker", idle, 10)
            .await
            .expect("stale")
            .is_empty()
    );
    assert!(
        store
            .reap("s3", idle, "reaper", "r3", Duration::from_secs(60))
            .await
            .expect("reap")
            .is_none(),
        "a live lease is not reaped"
    );
    store
        .release("s3", &live, Release::Failed)
        .await
        .expect("release");
}

async fn racing_claims(store: Arc<dyn StateStore>, id: &str) {
    let mut tasks = Vec::new();
    for n in 0..16 {
        let store = store.clone();
        let id = id.to_owned();
        tasks.push(tokio::spawn(async move {
            store
                .claim(claim(&id, "h", &format!("w{n}"), &format!("n{n}"), 60_000))
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

/// A handed-on message is known to every reader of the store until its time is up.
async fn handed_on_messages_are_remembered_for_their_time(store: &dyn StateStore) {
    let key = "body-hash:1:0";
    assert!(!store.was_handed_on(key).await.expect("ask"));
    store
        .remember_handed_on(key, Duration::from_millis(300))
        .await
        .expect("remember");
    assert!(store.was_handed_on(key).await.expect("ask"));
    assert!(
        !store.was_handed_on("body-hash:2:0").await.expect("ask"),
        "another attempt of the same body is another message"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!store.was_handed_on(key).await.expect("ask"), "forgotten");
}

/// A turn goes to one of several racing takers, and to the next only once it ends.
async fn a_turn_is_taken_by_one_until_it_ends(store: Arc<dyn StateStore>) {
    let hold = Duration::from_millis(400);
    let takers = (0..4).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.take_turn("reconcile:docker", hold).await })
    });
    let mut taken = 0;
    for taker in takers {
        taken += usize::from(taker.await.expect("join").expect("take"));
    }
    assert_eq!(taken, 1, "one taker of four");
    assert!(
        store
            .take_turn("reconcile:process", hold)
            .await
            .expect("take"),
        "another turn is its own"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        store
            .take_turn("reconcile:docker", hold)
            .await
            .expect("take"),
        "the turn ended"
    );
}

/// An expiry is taken once when due, by one of several racing takers; it comes due again
/// only if its taker does not cancel it in time (it died before sending the teardown).
async fn expiries_are_taken_once_when_due(store: Arc<dyn StateStore>) {
    let now = std::time::SystemTime::now();
    let retry = Duration::from_millis(400);
    store
        .schedule_expiry("docker", "exp-later", now + Duration::from_secs(3600))
        .await
        .expect("schedule");
    store
        .schedule_expiry("docker", "exp-due", now - Duration::from_secs(1))
        .await
        .expect("schedule");
    store
        .schedule_expiry("kubernetes", "exp-other", now - Duration::from_secs(1))
        .await
        .expect("schedule");
    let takers = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.take_due_expiries("docker", 16, retry).await })
    });
    let mut taken = Vec::new();
    for taker in takers {
        taken.extend(taker.await.expect("join").expect("take"));
    }
    let ids: Vec<&str> = taken.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        ["exp-due"],
        "one taker, only the due one, only this platform's"
    );
    let due_at = taken[0].1;
    let drift = due_at
        .duration_since(now - Duration::from_secs(1))
        .unwrap_or_else(|e| e.duration());
    assert!(
        drift < Duration::from_millis(5),
        "the time it was due: {drift:?}"
    );
    // Not cancelled: due again once the retry time passes, for one taker again.
    tokio::time::sleep(retry + Duration::from_millis(100)).await;
    let again = store
        .take_due_expiries("docker", 16, retry)
        .await
        .expect("take");
    assert_eq!(again.len(), 1, "{again:?}");
    store
        .cancel_expiry("docker", "exp-due")
        .await
        .expect("cancel");
    tokio::time::sleep(retry + Duration::from_millis(100)).await;
    assert!(
        store
            .take_due_expiries("docker", 16, retry)
            .await
            .expect("take")
            .is_empty(),
        "cancelled"
    );
    // Scheduling again replaces the time.
    store
        .schedule_expiry("docker", "exp-later", now - Duration::from_secs(1))
        .await
        .expect("reschedule");
    let rescheduled = store
        .take_due_expiries("docker", 16, retry)
        .await
        .expect("take");
    assert_eq!(rescheduled.len(), 1);
    assert_eq!(rescheduled[0].0, "exp-later");
    store
        .cancel_expiry("docker", "exp-later")
        .await
        .expect("cancel");
    store
        .cancel_expiry("kubernetes", "exp-other")
        .await
        .expect("cancel");
}

/// A tenant's machines are reserved atomically against its limit (its own, else the
/// default), once per request however often it asks, and given back on release.
async fn quotas_are_reserved_atomically_and_given_back(store: Arc<dyn StateStore>) {
    use provisioner_core::{DEFAULT_TENANT, MACHINES, QuotaCost, QuotaGrant, QuotaUsage};
    let none = QuotaCost::new();
    store
        .set_quota("team-a", MACHINES, Some(3))
        .await
        .expect("set");
    // Sixteen requests race for three machines: exactly three get one.
    let racers = (0..16).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            reserve(&*store, "team-a", &format!("qa-{i}"), &QuotaCost::new()).await
        })
    });
    let mut granted = Vec::new();
    for (i, racer) in racers.enumerate() {
        if racer.await.expect("join").expect("reserve") == QuotaGrant::Granted {
            granted.push(format!("qa-{i}"));
        }
    }
    assert_eq!(granted.len(), 3, "{granted:?}");
    // A holder asking again (a retry) is granted without counting twice.
    assert_eq!(
        reserve(&*store, "team-a", &granted[0], &none)
            .await
            .expect("again"),
        QuotaGrant::Granted
    );
    assert_eq!(
        reserve(&*store, "team-a", "qa-late", &none)
            .await
            .expect("late"),
        QuotaGrant::Exceeded {
            unit: MACHINES.into(),
            limit: 3,
            used: 3,
            wanted: 1
        }
    );
    // Only the holder reserves: one taken over, or a request never claimed, gets nothing.
    let stale = fence(1, "not-the-holder");
    assert!(matches!(
        store
            .reserve_quota("team-a", &granted[1], &stale, &none)
            .await,
        Err(StoreError::Fenced(_))
    ));
    assert!(matches!(
        store
            .reserve_quota("team-a", "qa-never-claimed", &stale, &none)
            .await,
        Err(StoreError::Missing(_))
    ));
    store.release_quota(&granted[0]).await.expect("release");
    store
        .release_quota(&granted[0])
        .await
        .expect("release twice is nothing");
    store
        .release_quota("never-held")
        .await
        .expect("release of nothing");
    assert_eq!(
        store.quota("team-a").await.expect("quota"),
        QuotaUsage {
            limit: Some(3),
            used: 2,
            units: Default::default()
        }
    );
    assert_eq!(
        reserve(&*store, "team-a", "qa-late", &none)
            .await
            .expect("late"),
        QuotaGrant::Granted
    );
    // The default limit covers tenants without their own; removing a limit lifts it.
    store
        .set_quota(DEFAULT_TENANT, MACHINES, Some(1))
        .await
        .expect("default");
    assert_eq!(
        reserve(&*store, "team-b", "qb-1", &none).await.expect("b1"),
        QuotaGrant::Granted
    );
    assert_eq!(
        reserve(&*store, "team-b", "qb-2", &none).await.expect("b2"),
        QuotaGrant::Exceeded {
            unit: MACHINES.into(),
            limit: 1,
            used: 1,
            wanted: 1
        }
    );
    store
        .set_quota(DEFAULT_TENANT, MACHINES, None)
        .await
        .expect("lift");
    assert_eq!(
        reserve(&*store, "team-b", "qb-2", &none).await.expect("b2"),
        QuotaGrant::Granted
    );
    assert_eq!(
        store.quota("team-c").await.expect("quota"),
        QuotaUsage {
            limit: None,
            used: 0,
            units: Default::default()
        }
    );
    for id in ["qa-late", "qb-1", "qb-2"]
        .into_iter()
        .map(str::to_owned)
        .chain(granted)
    {
        store.release_quota(&id).await.expect("release");
    }
    store
        .set_quota("team-a", MACHINES, None)
        .await
        .expect("lift");
}

/// Units beyond machines: each is checked against its own limit in the same atomic
/// reservation, a refusal names the unit, and a release gives back what was held.
async fn quota_units_are_reserved_with_the_machine_and_given_back(store: Arc<dyn StateStore>) {
    use provisioner_core::{DEFAULT_TENANT, MACHINES, QuotaCost, QuotaGrant, UnitUsage};
    let vcpus = |n: u64| QuotaCost::from([("vcpus".to_owned(), n)]);
    store
        .set_quota("team-u", "vcpus", Some(8))
        .await
        .expect("set");
    store
        .set_quota(DEFAULT_TENANT, "gpus", Some(1))
        .await
        .expect("default");
    // Eight vCPUs race in fours: two get theirs.
    let racers = (0..6).map(|i| {
        let store = store.clone();
        tokio::spawn(async move { reserve(&*store, "team-u", &format!("qu-{i}"), &vcpus(4)).await })
    });
    let mut granted = Vec::new();
    for (i, racer) in racers.enumerate() {
        if racer.await.expect("join").expect("reserve") == QuotaGrant::Granted {
            granted.push(format!("qu-{i}"));
        }
    }
    assert_eq!(granted.len(), 2, "{granted:?}");
    assert_eq!(
        reserve(&*store, "team-u", "qu-small", &vcpus(1))
            .await
            .expect("small"),
        QuotaGrant::Exceeded {
            unit: "vcpus".into(),
            limit: 8,
            used: 8,
            wanted: 1
        }
    );
    // A retry of a holder counts nothing twice, whatever it asks.
    assert_eq!(
        reserve(&*store, "team-u", &granted[0], &vcpus(4))
            .await
            .expect("again"),
        QuotaGrant::Granted
    );
    let usage = store.quota("team-u").await.expect("quota");
    assert_eq!((usage.limit, usage.used), (None, 2));
    assert_eq!(
        usage.units.get("vcpus"),
        Some(&UnitUsage {
            limit: Some(8),
            used: 8
        })
    );
    assert_eq!(
        usage.units.get("gpus"),
        Some(&UnitUsage {
            limit: Some(1),
            used: 0
        }),
        "the default's limit shows"
    );
    store.release_quota(&granted[0]).await.expect("release");
    store.release_quota(&granted[0]).await.expect("twice");
    assert_eq!(
        store
            .quota("team-u")
            .await
            .expect("quota")
            .units
            .get("vcpus"),
        Some(&UnitUsage {
            limit: Some(8),
            used: 4
        })
    );
    let two = QuotaCost::from([("vcpus".to_owned(), 2), ("gpus".to_owned(), 2)]);
    assert_eq!(
        reserve(&*store, "team-u", "qu-gpu", &two)
            .await
            .expect("gpu"),
        QuotaGrant::Exceeded {
            unit: "gpus".into(),
            limit: 1,
            used: 0,
            wanted: 2
        },
        "the default's limit of another unit applies"
    );
    assert_eq!(
        store.quota("team-u").await.expect("quota").units["vcpus"].used,
        4,
        "a refusal holds nothing"
    );
    store.release_quota(&granted[1]).await.expect("release");
    store
        .set_quota("team-u", "vcpus", None)
        .await
        .expect("lift");
    store
        .set_quota(DEFAULT_TENANT, "gpus", None)
        .await
        .expect("lift");
    store
        .set_quota("team-u", MACHINES, None)
        .await
        .expect("lift");
}

/// A fleet's coordinator numbers its many events through the store, keeps the fleet's
/// request there, and reads its members' records in one go.
async fn fleets_number_their_events_and_are_kept(store: &dyn StateStore) {
    let (f1, seq, _, _, _) = claimed(store, claim("fleet-1", "h", "a", "n1", 60_000)).await;
    assert_eq!(store.next_seq("fleet-1", &f1).await.expect("seq"), seq + 1);
    assert_eq!(store.next_seq("fleet-1", &f1).await.expect("seq"), seq + 2);
    assert!(matches!(
        store.next_seq("fleet-1", &fence(f1.counter, "other")).await,
        Err(StoreError::Fenced(_))
    ));
    // A worker taking the fleet over numbers its events after every reserved one.
    store
        .release("fleet-1", &f1, Release::Failed)
        .await
        .expect("release");
    let (_, seq2, _, takeover, _) = claimed(store, claim("fleet-1", "h", "b", "n2", 60_000)).await;
    assert!(takeover);
    assert_eq!(seq2, seq + 3);

    assert_eq!(store.fleet("fleet-1").await.expect("fleet"), None);
    store
        .put_fleet("fleet-1", r#"{"count":3}"#)
        .await
        .expect("put");
    assert_eq!(
        store.fleet("fleet-1").await.expect("fleet").as_deref(),
        Some(r#"{"count":3}"#)
    );

    let ids: Vec<String> = (0..300).map(|i| format!("fleet-1#{i}")).collect();
    for id in ids.iter().step_by(7) {
        claimed(store, claim(id, "h", "a", "n", 60_000)).await;
    }
    let records = store.get_many(&ids).await.expect("get many");
    assert_eq!(records.len(), ids.len());
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.is_some(), i % 7 == 0, "member {i}");
    }
}

/// API token buckets: a burst at once, then reservations spaced by the rate, nothing
/// reserved past the caller's wait, and the rate halved by a throttling answer and given
/// back by calls that were not.
async fn api_buckets_pace_callers_and_adapt(store: &dyn StateStore) {
    use provisioner_core::{RateLimit, TokenGrant};
    let limit = RateLimit::new("RunInstances", "conformance", 3.0, 10.0);
    let key = limit.key("test");
    let wait = Duration::from_secs(5);
    for _ in 0..3 {
        assert_eq!(
            store.take_tokens(&key, &limit, wait).await.expect("take"),
            TokenGrant::Now
        );
    }
    let after = |grant: TokenGrant| match grant {
        TokenGrant::After(wait) => wait,
        other => panic!("expected a reservation, got {other:?}"),
    };
    let first = after(store.take_tokens(&key, &limit, wait).await.expect("take"));
    let second = after(store.take_tokens(&key, &limit, wait).await.expect("take"));
    assert!(first <= Duration::from_millis(100), "{first:?}");
    assert!(
        second >= first + Duration::from_millis(60),
        "{first:?} then {second:?}"
    );
    // Further ahead than the caller waits: nothing reserved, so asking again is the same.
    let later = |grant: TokenGrant| match grant {
        TokenGrant::Later(again) => again,
        other => panic!("expected later, got {other:?}"),
    };
    let a = later(
        store
            .take_tokens(&key, &limit, Duration::ZERO)
            .await
            .expect("take"),
    );
    let b = later(
        store
            .take_tokens(&key, &limit, Duration::ZERO)
            .await
            .expect("take"),
    );
    assert!(
        b <= a + Duration::from_millis(20),
        "{a:?} then {b:?}: the first reserved"
    );
    // Throttled: half the rate, so the next reservation is at least twice as far out.
    tokio::time::sleep(Duration::from_millis(400)).await;
    store
        .adapt_rate(&key, &limit, true)
        .await
        .expect("slow down");
    let slowed = after(store.take_tokens(&key, &limit, wait).await.expect("take"));
    assert!(slowed >= Duration::from_millis(190), "{slowed:?}");
    for _ in 0..20 {
        store
            .adapt_rate(&key, &limit, false)
            .await
            .expect("speed up");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Back at the default: a second refills ten tokens, more than the capacity.
    for _ in 0..3 {
        assert_eq!(
            store.take_tokens(&key, &limit, wait).await.expect("take"),
            TokenGrant::Now
        );
    }
    let restored = after(store.take_tokens(&key, &limit, wait).await.expect("take"));
    assert!(restored <= Duration::from_millis(110), "{restored:?}");
}

async fn conformance(store: Arc<dyn StateStore>) {
    api_buckets_pace_callers_and_adapt(store.as_ref()).await;
    fleets_number_their_events_and_are_kept(store.as_ref()).await;
    quotas_are_reserved_atomically_and_given_back(store.clone()).await;
    quota_units_are_reserved_with_the_machine_and_given_back(store.clone()).await;
    expiries_are_taken_once_when_due(store.clone()).await;
    handed_on_messages_are_remembered_for_their_time(store.as_ref()).await;
    a_turn_is_taken_by_one_until_it_ends(store.clone()).await;
    claims_leases_and_fences(store.as_ref()).await;
    a_teardown_tombstones_its_target_whatever_the_interleaving(store.as_ref()).await;
    abandoned_records_are_found_and_taken_over_once(store.as_ref()).await;
    racing_claims(store, "race").await;
}

#[tokio::test]
async fn memory_store_conforms() {
    conformance(Arc::new(MemoryStore::new())).await;
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn redis_store(prefix: &str) -> Arc<dyn StateStore> {
    Arc::new(
        RedisStore::connect(&redis_url(), prefix, Duration::from_secs(600))
            .await
            .expect("Redis must be running (the README's test command starts it)")
            .for_platform(PlatformName::Docker),
    )
}

fn new_prefix() -> String {
    format!("test-{}:", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn redis_store_conforms_on_redis() {
    conformance(redis_store(&new_prefix()).await).await;
}

#[tokio::test]
async fn a_lost_record_never_lets_the_old_holder_write_on_redis() {
    // The key is lost (a Redis without persistence restarted, an eviction): the next claim
    // starts again at fence 1, but the old holder's nonce is not the new one.
    let prefix = new_prefix();
    let store = redis_store(&prefix).await;
    let (zombie, ..) = claimed(store.as_ref(), claim("lost", "h", "zombie", "z", 60_000)).await;
    let mut redis = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}docker:req:lost"))
        .query_async(&mut redis)
        .await
        .expect("del");
    let (fresh, ..) = claimed(store.as_ref(), claim("lost", "h", "new", "fresh", 60_000)).await;
    assert_eq!(
        fresh.counter, zombie.counter,
        "the counter alone would not tell them apart"
    );
    assert!(matches!(
        store.renew("lost", &zombie, Duration::from_secs(5)).await,
        Err(StoreError::Fenced(_))
    ));
    assert!(matches!(
        store
            .complete("lost", &zombie, &terminal("lost", 2, State::Running))
            .await,
        Err(StoreError::Fenced(_))
    ));
    store
        .complete("lost", &fresh, &terminal("lost", 2, State::Running))
        .await
        .expect("the new holder writes");
}

#[tokio::test]
async fn finished_records_expire_after_the_retention_and_running_ones_never_on_redis() {
    let prefix = new_prefix();
    let store = RedisStore::connect(&redis_url(), &prefix, Duration::from_millis(300))
        .await
        .expect("redis")
        .for_platform(PlatformName::Docker);
    let (f, ..) = claimed(&store, claim("kept", "h", "a", "k", 200)).await;
    let (done, ..) = claimed(&store, claim("gone", "h", "a", "g", 60_000)).await;
    store
        .complete("gone", &done, &terminal("gone", 2, State::Running))
        .await
        .expect("complete");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(store.get("gone").await.expect("get").is_none());
    assert!(
        store.get("kept").await.expect("get").is_some(),
        "in progress, even with its lease long over"
    );
    let _ = f;
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

/// A store written in key layout version 1 (everything directly under the prefix): a
/// worker refuses to start on it, naming the command that moves it; the migration moves
/// every record to its platform's space (a tombstone-only record by its teardown's),
/// splits the in-progress index, moves schedules and quota reservations, seals the
/// fleets it moves, names what says no platform, and is safe to run again.
#[tokio::test]
async fn a_store_of_layout_1_is_refused_until_migrated_and_then_each_platform_finds_its_own() {
    use provisioner_core::signing::SigningKeys;
    use redis::AsyncCommands;
    let prefix = new_prefix();
    let mut redis = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let result = serde_json::to_string(&terminal("a", 2, State::Running)).expect("json");
    let fleet = r#"{"schema_version":1,"request_id":"f","operation":"provision","platform":"docker","count":2,"spec":{"image":"x"}}"#;
    let fleet_hash = provisioner_events::decode_request(fleet.as_bytes())
        .expect("a request")
        .payload_hash();
    let planted = r#"{"schema_version":1,"request_id":"p","operation":"provision","platform":"docker","count":9,"spec":{"image":"x"}}"#;
    let mut pipe = redis::pipe();
    pipe.hset_multiple(
        format!("{prefix}req:a"),
        &[
            ("hash", "h"),
            ("state", "running"),
            ("route", "docker.provision"),
            ("fence", "1"),
            ("seq", "2"),
            ("attempts", "1"),
            ("result", result.as_str()),
        ],
    )
    .hset_multiple(
        format!("{prefix}req:td"),
        &[
            ("hash", "h"),
            ("state", "stopping"),
            ("route", "docker.teardown"),
            ("fence", "1"),
            ("lease_until", "0"),
        ],
    )
    .hset_multiple(
        format!("{prefix}req:t"),
        &[("state", "not_started"), ("tombstone", "td")],
    )
    .hset_multiple(
        format!("{prefix}req:e"),
        &[
            ("hash", "h"),
            ("state", "starting"),
            ("route", "aws-ec2.provision"),
            ("fence", "1"),
            ("lease_until", "0"),
        ],
    )
    .hset_multiple(
        format!("{prefix}req:f"),
        &[
            ("hash", fleet_hash.as_str()),
            ("state", "starting"),
            ("route", "docker.provision"),
            ("fence", "1"),
        ],
    )
    .hset_multiple(format!("{prefix}req:x"), &[("state", "not_started")])
    .hset_multiple(
        format!("{prefix}req:p"),
        &[
            ("hash", "h"),
            ("state", "starting"),
            ("route", "docker.provision"),
        ],
    )
    .zadd(format!("{prefix}inflight"), "td", 1)
    .zadd(format!("{prefix}inflight"), "e", 1)
    .zadd(format!("{prefix}expiries:docker"), "a", 1)
    .zadd(format!("{prefix}expiries:docker/fleets"), "f", 1)
    .set(format!("{prefix}fleet:f"), fleet)
    .pset_ex(format!("{prefix}fleet:p"), planted, 600_000)
    .sadd(format!("{prefix}quota-holders:team"), "a")
    .sadd(format!("{prefix}quota-holders:team"), "e")
    .set(format!("{prefix}quota-holder:a"), "team")
    .set(format!("{prefix}quota-holder:e"), "team")
    .hset(format!("{prefix}quota-holder-cost:a"), "vcpus", 2)
    .hset(format!("{prefix}quota-used:team"), "vcpus", 2);
    let () = pipe.query_async(&mut redis).await.expect("seed layout 1");

    let base = RedisStore::connect(&redis_url(), &prefix, Duration::from_secs(600))
        .await
        .expect("redis");
    let docker = base.for_platform(PlatformName::Docker);
    let ec2 = base.for_platform(PlatformName::AwsEc2);
    let refused = docker.check_layout().await.expect_err("refused");
    assert!(
        refused.to_string().contains("provisioner migrate-store"),
        "{refused}"
    );

    let keys = SigningKeys::parse(
        "k1=a-secret-of-at-least-thirty-two-bytes!!",
        Duration::from_secs(60),
    )
    .expect("keys");
    let report = base.migrate_from_v1(Some(&keys)).await.expect("migrate");
    assert_eq!(
        report.left,
        vec![
            format!("{prefix}req:x"),
            format!("{prefix}fleet:p (not the request its record ran)"),
        ],
        "a record that says no platform, and a fleet planted in the old store: {report:?}"
    );
    docker.check_layout().await.expect("layout 2");
    ec2.check_layout().await.expect("layout 2");

    let a = docker.get("a").await.expect("get").expect("moved");
    assert_eq!(a.result.map(|r| r.state), Some(State::Running));
    assert_eq!(
        docker
            .get("t")
            .await
            .expect("get")
            .and_then(|r| r.torn_down_by)
            .as_deref(),
        Some("td"),
        "a tombstone-only record goes with its teardown"
    );
    assert!(
        docker.get("e").await.expect("get").is_none(),
        "EC2's is not Docker's"
    );
    assert!(ec2.get("e").await.expect("get").is_some());
    let idle = Duration::from_millis(1);
    assert_eq!(
        docker.stale("docker", idle, 10).await.expect("stale"),
        vec!["td".to_owned()]
    );
    assert_eq!(
        ec2.stale("aws-ec2", idle, 10).await.expect("stale"),
        vec!["e".to_owned()]
    );
    let due = docker
        .take_due_expiries("docker", 10, Duration::from_secs(60))
        .await
        .expect("due");
    assert_eq!(
        due.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["a"]
    );
    let due = docker
        .take_due_expiries("docker/fleets", 10, Duration::from_secs(60))
        .await
        .expect("due");
    assert_eq!(
        due.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["f"]
    );
    let stored = docker.fleet("f").await.expect("get").expect("moved");
    let opened = keys
        .open(
            "fleet docker/f",
            &stored,
            std::time::SystemTime::now(),
            Duration::from_secs(600),
        )
        .expect("sealed by the migration (kept without an expiry, so sealed now)");
    assert_eq!(opened.body, fleet);
    let ttl: i64 = redis
        .pttl(format!("{prefix}docker:fleet:f"))
        .await
        .expect("pttl");
    assert!(
        ttl > 0 && ttl <= 600_000,
        "a fleet moved without an expiry is given the retention: {ttl}"
    );
    assert_eq!(docker.quota("team").await.expect("quota").used, 2);
    docker.release_quota("a").await.expect("release");
    let usage = docker.quota("team").await.expect("quota");
    assert_eq!(
        usage.used, 1,
        "the holder moved with its request: {usage:?}"
    );
    assert_eq!(usage.units.get("vcpus").map(|u| u.used), Some(0));
    ec2.release_quota("e").await.expect("release");
    assert_eq!(docker.quota("team").await.expect("quota").used, 0);

    let again = base.migrate_from_v1(Some(&keys)).await.expect("again");
    assert_eq!(again.moved, 0);
    assert_eq!(again.left, report.left);

    // A run stopped halfway: records moved, an index entry and a holder not yet. The
    // next run finds their platform by the records in the new layout and loses neither.
    let mut pipe = redis::pipe();
    pipe.zadd(format!("{prefix}inflight"), "td", 5)
        .sadd(format!("{prefix}quota-holders:team"), "a")
        .set(format!("{prefix}quota-holder:a"), "team");
    let () = pipe.query_async(&mut redis).await.expect("half a run");
    let resumed = base.migrate_from_v1(Some(&keys)).await.expect("resumed");
    assert_eq!(resumed.left, report.left, "{resumed:?}");
    assert_eq!(
        docker.stale("docker", idle, 10).await.expect("stale"),
        vec!["td".to_owned()]
    );
    assert_eq!(docker.quota("team").await.expect("quota").used, 1);
    docker.release_quota("a").await.expect("release");
    assert_eq!(docker.quota("team").await.expect("quota").used, 0);
}
