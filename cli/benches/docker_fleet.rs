//! A fleet of containers on the real engine (Podman's Docker API, or Docker): its time
//! through the system against starting the same containers directly through the engine,
//! in one run, on the real RabbitMQ and Redis.
//!
//! - **direct**: N containers created and started straight through the engine API from one
//!   process, 16 calls in flight (the workers' default prefetch), until every one has
//!   started; then stopped and removed the way a worker's teardown does.
//! - **fleet**: one request of `count` N through three in-process Docker workers (members
//!   published and spread, claims, records, events, the coordinator), publish to the
//!   fleet's terminal event; then its teardown.
//!
//! `scripts/bench.sh` runs it (release build); `BENCH_SHORT=1` is the quick mode CI runs.
//! `BENCH_DOCKER_FLEET` sets N (default 200; 20 in quick mode). Needs RabbitMQ (with
//! `rabbitmqctl`), Redis (`REDIS_URL`), an engine (`DOCKER_HOST`) and the image
//! `localhost/busybox:latest` (`scripts/dev-services.sh` builds it).

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use provisioner_docker::{DockerPlatform, DockerPolicy};
use provisioner_events::State;

const IMAGE: &str = "localhost/busybox:latest";
/// Engine calls in flight at once on the direct path: the workers' default prefetch.
const IN_FLIGHT: usize = 16;

fn docker_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///run/podman/podman.sock".into())
}

/// Containers labelled `bench-run` = `run`, running or not.
async fn labelled(docker: &Docker, run: &str) -> Vec<String> {
    let filters = HashMap::from([("label", vec![format!("bench-run={run}")])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    docker
        .list_containers(Some(options))
        .await
        .expect("list containers")
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// Stops (with the workers' 10 s grace: `sleep` as PID 1 ignores SIGTERM, so it is
/// the grace and then SIGKILL) and removes `ids`, `IN_FLIGHT` at a time: the calls a
/// worker's teardown makes.
async fn remove_all(docker: &Docker, ids: Vec<String>) {
    futures_util::stream::iter(ids)
        .map(|id| async move {
            let stop = StopContainerOptionsBuilder::default().t(10).build();
            docker
                .stop_container(&id, Some(stop))
                .await
                .expect("stop container");
            let options = RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            docker
                .remove_container(&id, Some(options))
                .await
                .expect("remove container");
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
}

/// The direct baseline: `count` containers created and started, `IN_FLIGHT` at a time.
async fn direct_up(docker: &Docker, count: usize, run: &str) -> Duration {
    let started = Instant::now();
    futures_util::stream::iter(0..count)
        .map(|i| async move {
            let name = format!("bench-direct-{run}-{i}");
            let body = ContainerCreateBody {
                image: Some(IMAGE.into()),
                cmd: Some(vec!["sleep".into(), "3600".into()]),
                labels: Some(HashMap::from([("bench-run".into(), run.to_owned())])),
                ..Default::default()
            };
            let options = CreateContainerOptionsBuilder::default().name(&name).build();
            docker
                .create_container(Some(options), body)
                .await
                .expect("create container");
            docker
                .start_container(&name, None)
                .await
                .expect("start container");
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    started.elapsed()
}

fn main() {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(harness());
}

async fn harness() {
    let short = std::env::var("BENCH_SHORT").is_ok_and(|v| v == "1");
    let count: usize = std::env::var("BENCH_DOCKER_FLEET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if short { 20 } else { 200 });
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let docker = Docker::connect_with_unix(
        docker_host().trim_start_matches("unix://"),
        120,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("docker");

    let direct_run = format!("direct-{tag}");
    let direct = direct_up(&docker, count, &direct_run).await;
    let ids = labelled(&docker, &direct_run).await;
    assert_eq!(ids.len(), count);
    let started = Instant::now();
    remove_all(&docker, ids).await;
    let direct_down = started.elapsed();

    let platform = Arc::new(
        DockerPlatform::connect(Some(&docker_host()), DockerPolicy::default())
            .await
            .expect("engine"),
    );
    let mut fleet_workers = support::Fleet::start(platform, &tag).await;

    let fleet_run = format!("fleet-{tag}");
    let id = format!("bench-docker-fleet-{tag}");
    let body = format!(
        r#"{{"schema_version":1,"request_id":"{id}","operation":"provision","platform":"docker","count":{count},"labels":{{"bench-run":"{fleet_run}"}},"spec":{{"image":"{IMAGE}","command":["sleep","3600"]}}}}"#
    );
    let (end, fleet) = fleet_workers.run("docker.provision", &id, &body).await;
    assert_eq!(end.state, State::Running, "{end:#?}");
    assert_eq!(
        labelled(&docker, &fleet_run).await.len(),
        count,
        "exactly one container per member"
    );

    let down = format!("bench-docker-fleet-down-{tag}");
    let body = format!(
        r#"{{"schema_version":1,"request_id":"{down}","operation":"teardown","platform":"docker","target_request_id":"{id}"}}"#
    );
    let (end, fleet_down) = fleet_workers.run("docker.teardown", &down, &body).await;
    assert_eq!(end.state, State::Stopped, "{end:#?}");
    let left = labelled(&docker, &fleet_run).await;
    assert!(
        left.is_empty(),
        "containers left after the fleet's teardown"
    );

    let ratio =
        |d: Duration, base: Duration| d.as_secs_f64() / base.as_secs_f64().max(f64::EPSILON);
    println!("## Fleet of {count} containers on the engine, 3 workers\n");
    println!("| path | up, s | ratio | down, s | ratio |\n|---|---|---|---|---|");
    println!(
        "| direct: the engine API, {IN_FLIGHT} calls in flight | {:.1} | 1.00 | {:.1} | 1.00 |",
        direct.as_secs_f64(),
        direct_down.as_secs_f64()
    );
    println!(
        "| fleet: one request, members over 3 workers | {:.1} | {:.2} | {:.1} | {:.2} |",
        fleet.as_secs_f64(),
        ratio(fleet, direct),
        fleet_down.as_secs_f64(),
        ratio(fleet_down, direct_down)
    );

    fleet_workers.stop().await;
}
