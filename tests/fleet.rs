//! Fleets end to end, on the real RabbitMQ, Redis and Podman: one request for many
//! containers, its members spread over the workers, never more than asked whatever is
//! duplicated or killed, `min_count` under both policies, expiry, and the teardown of a
//! whole fleet.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Events, TestEnv, id};
use provisioner_events::{ErrorClass, State, StatusEvent};

/// A fleet of `count` sleeping containers (no ports: a fleet of batch workers).
fn fleet(env: &TestEnv, name: &str, count: u32) -> serde_json::Value {
    serde_json::json!({
        "schema_version": 1, "request_id": format!("{name}-{}", env.run_id),
        "operation": "provision", "platform": "docker", "count": count,
        "spec": {"image": "localhost/busybox:latest", "command": ["sleep", "3600"]},
        "labels": {"test-run": env.run_id}
    })
}

/// The fleet's own events, in order, checked: `seq` 1, 2, 3… and counts out of `count`.
fn fleet_events(events: &Events, fleet_id: &str, count: u32) -> Vec<StatusEvent> {
    let mut own: Vec<StatusEvent> = events.of(fleet_id).into_iter().cloned().collect();
    own.sort_by_key(|e| e.seq);
    own.dedup_by_key(|e| e.seq);
    for (i, event) in own.iter().enumerate() {
        assert_eq!(event.seq, i as u64 + 1, "gap or repeat: {own:#?}");
        let fleet = event.fleet.as_ref().expect("fleet status");
        assert_eq!(fleet.count, count);
        assert_eq!(fleet.members.expect("counts").total(), count, "{event:#?}");
    }
    own
}

/// Every container of the fleet, one per member and no more.
fn assert_one_container_per_member(
    containers: &HashMap<String, Vec<String>>,
    fleet_id: &str,
    count: u32,
) {
    let members: Vec<(&String, &Vec<String>)> = containers
        .iter()
        .filter(|(request, _)| request.starts_with(&format!("{fleet_id}#")))
        .collect();
    assert_eq!(members.len(), count as usize, "{containers:?}");
    for (request, ids) in members {
        assert_eq!(ids.len(), 1, "{request} has {ids:?}");
    }
}

async fn fleet_end(events: &mut Events, fleet_id: &str) -> StatusEvent {
    let id = fleet_id.to_owned();
    events
        .until(
            Duration::from_secs(600),
            &format!("the end of fleet {fleet_id}"),
            move |e| e.request_id == id && e.ends_request(),
        )
        .await
}

#[tokio::test]
async fn a_fleet_spreads_over_3_workers_and_goes_with_one_teardown() {
    spread_over_three_workers(30).await;
}

/// The figure: 200 containers. Long, so `scripts/test-long.sh` runs it alone.
#[tokio::test]
#[ignore = "long: scripts/test-long.sh runs it"]
async fn a_fleet_of_200_containers_spreads_over_3_workers_and_goes_with_one_teardown() {
    spread_over_three_workers(200).await;
}

async fn spread_over_three_workers(count: u32) {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    for name in ["a", "b", "c"] {
        env.start_worker(name);
    }
    for name in ["a", "b", "c"] {
        env.wait_for_log(name, "consuming").await;
    }
    let request = fleet(&env, "fleet", count);
    let fleet_id = id(&request);
    // A duplicate of the fleet's message makes nothing more.
    env.publish(&request).await;
    env.publish(&request).await;

    let end = fleet_end(&mut events, &fleet_id).await;
    assert_eq!(end.state, State::Running, "{:#?}", end.error);
    let members = &end.resource.as_ref().expect("resource").members;
    assert_eq!(members.len(), count as usize);
    for (i, member) in members.iter().enumerate() {
        assert_eq!(member.request_id, format!("{fleet_id}#{i}"));
        assert_eq!(member.state, State::Running, "{member:?}");
        assert!(member.id.is_some(), "{member:?}");
    }
    let own = fleet_events(&events, &fleet_id, count);
    // Seen while it grew: some running, some not yet.
    assert!(
        own.iter().any(|e| {
            let counts = e.fleet.as_ref().and_then(|f| f.members).expect("counts");
            counts.running > 0 && counts.running < count
        }),
        "no progress between none and all: {own:#?}"
    );
    assert_one_container_per_member(&env.containers().await, &fleet_id, count);
    // Every worker took part: members are requests of their own on the shared queue.
    for name in ["a", "b", "c"] {
        assert!(
            env.worker_log(name).contains(&format!("{fleet_id}#")),
            "worker {name} ran no member"
        );
    }
    // Each member told its own story, naming its fleet.
    let member_end = events.terminal(&format!("{fleet_id}#7")).await;
    let member_fleet = member_end.fleet.expect("member's fleet");
    assert_eq!(
        (member_fleet.request_id.as_str(), member_fleet.index),
        (fleet_id.as_str(), Some(7))
    );

    let down = env.teardown("fcount-down", &fleet_id);
    env.publish(&down).await;
    let stopped = fleet_end(&mut events, &id(&down)).await;
    assert_eq!(stopped.state, State::Stopped, "{:#?}", stopped.error);
    assert_eq!(
        stopped.fleet.and_then(|f| f.members).map(|c| c.stopped),
        Some(count)
    );
    assert!(env.containers().await.is_empty());
}

#[tokio::test]
async fn a_worker_killed_mid_fleet_leaves_it_exactly_as_large_as_asked() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let doomed = env.start_worker("doomed");
    env.start_worker("survivor");
    // Slow members, so the kill lands while the fleet grows.
    let mut request = fleet(&env, "fkill", 24);
    request["spec"]["command"] = serde_json::json!(["sh", "-c", "sleep 3; exec httpd -f -p 8080"]);
    request["spec"]["ports"] = serde_json::json!([8080]);
    request["spec"]["health"] = serde_json::json!({"tcp": {"port": 8080}});
    let fleet_id = id(&request);
    env.publish(&request).await;
    let first_running = fleet_id.clone();
    events
        .until(Duration::from_secs(60), "a running member", move |e| {
            e.state == State::Running && e.request_id.starts_with(&format!("{first_running}#"))
        })
        .await;
    env.worker(doomed).kill().expect("SIGKILL");
    env.start_worker("late");
    env.publish(&request).await;

    let end = fleet_end(&mut events, &fleet_id).await;
    assert_eq!(end.state, State::Running, "{:#?}", end.error);
    fleet_events(&events, &fleet_id, 24);
    assert_one_container_per_member(&env.containers().await, &fleet_id, 24);
}

#[tokio::test]
async fn min_count_keeps_a_partial_fleet_or_rolls_it_back() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("a");
    env.start_worker("b");
    // The tenant has room for 3 machines: 2 members of 5 are refused (class `quota`).
    let tenant = format!("fleet-{}", env.run_id);
    let set = env.cli(&["quota", "set", &tenant, "3"]);
    assert!(set.status.success(), "{set:?}");

    let mut kept = fleet(&env, "fkeep", 5);
    kept["tenant"] = tenant.as_str().into();
    kept["min_count"] = 3.into();
    kept["on_partial"] = "keep".into();
    env.publish(&kept).await;
    let end = fleet_end(&mut events, &id(&kept)).await;
    assert_eq!(end.state, State::Running, "{end:#?}");
    let counts = end.fleet.as_ref().and_then(|f| f.members).expect("counts");
    assert_eq!((counts.running, counts.error), (3, 2), "{end:#?}");
    let refused = end
        .resource
        .as_ref()
        .expect("resource")
        .members
        .iter()
        .filter(|m| {
            m.error
                .as_ref()
                .is_some_and(|e| e.class == ErrorClass::Quota)
        })
        .count();
    assert_eq!(refused, 2);

    // All or nothing (the default) with no room left: rolled back, nothing stays.
    let mut all = fleet(&env, "fall", 3);
    all["tenant"] = tenant.as_str().into();
    let set = env.cli(&["quota", "set", &tenant, "4"]);
    assert!(set.status.success(), "{set:?}");
    env.publish(&all).await;
    let end = fleet_end(&mut events, &id(&all)).await;
    assert_eq!(end.state, State::Error, "{end:#?}");
    let error = end.error.as_ref().expect("error");
    assert_eq!(error.class, ErrorClass::Quota, "{error:?}");
    assert!(error.message.contains("rollback"), "{error:?}");
    let containers = env.containers().await;
    assert!(
        !containers
            .keys()
            .any(|k| k.starts_with(&format!("{}#", id(&all)))),
        "{containers:?}"
    );
    assert_one_container_per_member(&containers, &id(&kept), 3);
}

#[tokio::test]
async fn an_expired_fleet_is_removed_once_with_two_workers_running() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("a");
    env.start_worker("b");
    let mut request = fleet(&env, "fttl", 3);
    request["ttl_seconds"] = 3.into();
    let fleet_id = id(&request);
    env.publish(&request).await;
    assert_eq!(
        fleet_end(&mut events, &fleet_id).await.state,
        State::Running
    );
    for i in 0..3 {
        let teardown = format!("{fleet_id}#{i}.expired");
        let end = events.terminal(&teardown).await;
        assert_eq!(end.state, State::Stopped, "{end:#?}");
        assert!(end.cause.as_deref().unwrap_or_default().contains("expired"));
    }
    events.drain(Duration::from_secs(3)).await;
    for i in 0..3 {
        let teardown = format!("{fleet_id}#{i}.expired");
        let ends = events
            .of(&teardown)
            .into_iter()
            .filter(|e| e.ends_request())
            .count();
        assert_eq!(ends, 1, "member {i} torn down more than once");
    }
    assert!(env.containers().await.is_empty());
}
