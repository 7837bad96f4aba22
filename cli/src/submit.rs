//! `provisioner submit`: validate requests locally, publish them with confirms, and with
//! `--wait` follow the status topic until each is terminal. Embedded when no services are
//! configured.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use provisioner_core::{Broker, MemoryBroker, MemoryStore, Worker, WorkerConfig};
use provisioner_events::{
    FleetCounts, Operation, PlatformName, Request, State, StatusEvent, decode_request,
};
use tracing::Instrument;

use crate::config::{Connections, PlatformSettings, build_platform};
use crate::{EXIT_DATA, Failure};

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Requests: one JSON object, a JSON array, or one object per line; `-` reads stdin.
    pub file: String,
    /// Follow each request to its terminal state; exit 1 if any ends in `error`.
    /// Requests that act on an existing resource (teardown) are published only after every
    /// earlier request in the file has ended. Always on in the embedded mode.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long (exit 75).
    #[arg(long, default_value_t = 300)]
    pub timeout_seconds: u64,
    /// Print events as JSON lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub platforms: PlatformSettings,
}

const EXIT_TEMPFAIL: u8 = 75;

/// One request to publish: what it says, and the bytes as the producer wrote them.
struct Outgoing {
    request: Request,
    body: Vec<u8>,
}

fn read_requests(file: &str) -> Result<Vec<Outgoing>, Failure> {
    let text = if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
        text
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| Failure::config(anyhow!("cannot read {file}: {e}")))?
    };
    let items: Vec<serde_json::Value> = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(items)) => items,
        Ok(item) => vec![item],
        Err(_) => text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(n, line)| {
                serde_json::from_str(line).map_err(|e| Failure {
                    code: EXIT_DATA,
                    error: anyhow!("{file} line {}: not JSON: {e}", n + 1),
                })
            })
            .collect::<Result<_, _>>()?,
    };
    if items.is_empty() {
        return Err(Failure {
            code: EXIT_DATA,
            error: anyhow!("{file} holds no requests"),
        });
    }
    let mut outgoing = Vec::new();
    let mut problems = Vec::new();
    for (n, item) in items.into_iter().enumerate() {
        let body = serde_json::to_vec(&item).context("re-encoding a request")?;
        match decode_request(&body) {
            Ok(request) => match request.check_from_producer() {
                Ok(()) => outgoing.push(Outgoing { request, body }),
                Err(e) => problems.push(format!("request {} ({}): {e}", n + 1, request.request_id)),
            },
            Err(e) => problems.push(format!(
                "request {} ({}): {}",
                n + 1,
                e.request_id.as_deref().unwrap_or("no request_id"),
                e.message
            )),
        }
    }
    if !problems.is_empty() {
        return Err(Failure {
            code: EXIT_DATA,
            error: anyhow!(
                "nothing was published; fix these first:\n  {}",
                problems.join("\n  ")
            ),
        });
    }
    Ok(outgoing)
}

pub fn print_event(event: &StatusEvent, json: bool) {
    if json {
        if let Ok(line) = serde_json::to_string(event) {
            println!("{line}");
        }
        return;
    }
    let time = event.timestamp.time();
    let mut line = format!(
        "{:02}:{:02}:{:02}  {:<24} {:<10} {:<8} seq {} attempt {}",
        time.hour(),
        time.minute(),
        time.second(),
        event.request_id,
        event.platform,
        event.state,
        event.seq,
        event.attempt
    );
    if let Some(resource) = event.resource.as_ref().filter(|r| r.members.is_empty()) {
        line.push_str(&format!("  {} ({})", resource.name, short_id(&resource.id)));
        for endpoint in &resource.endpoints {
            line.push_str(&format!(
                "  {}:{}->{}",
                endpoint.host, endpoint.host_port, endpoint.port
            ));
        }
    }
    if let Some(counts) = event
        .fleet
        .as_ref()
        .and_then(|f| f.members.map(|m| (f.count, m)))
    {
        line.push_str(&format!("  members: {}", counts_text(counts.0, &counts.1)));
    }
    if let Some(error) = &event.error {
        line.push_str(&format!("  {}: {}", error.class, error.message));
    }
    if let Some(refused) = &event.rejected_message {
        line.push_str(&format!(
            "  [answers only the message with body sha256 {}…]",
            short_id(&refused.body_sha256)
        ));
    }
    println!("{line}");
}

/// A fleet's counts in a few words: `120 running, 3 error, 77 not started of 200`.
fn counts_text(count: u32, counts: &FleetCounts) -> String {
    let parts: Vec<String> = [
        (counts.running, "running"),
        (counts.starting, "starting"),
        (counts.stopping, "stopping"),
        (counts.stopped, "stopped"),
        (counts.error, "error"),
        (counts.not_started, "not started"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    format!("{} of {count}", parts.join(", "))
}

/// A fleet's progress as one line redrawn in place on a terminal: a bar of the members
/// that have ended, and the counts.
fn draw_progress(event: &StatusEvent, started: tokio::time::Instant) {
    let Some((count, counts)) = event
        .fleet
        .as_ref()
        .and_then(|f| f.members.map(|m| (f.count, m)))
    else {
        return;
    };
    const WIDTH: u32 = 30;
    let ended = counts.running + counts.stopped + counts.error;
    let filled = (ended * WIDTH).checked_div(count).unwrap_or(WIDTH);
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '-' })
        .collect();
    eprint!(
        "\r\x1b[2K{} [{bar}] {} ({} s)",
        event.request_id,
        counts_text(count, &counts),
        started.elapsed().as_secs()
    );
}

/// The summary of a fleet's end: how many, how long, which members failed and why.
fn fleet_summary(event: &StatusEvent, elapsed: Duration) -> Option<String> {
    let fleet = event.fleet.as_ref()?;
    let counts = fleet.members?;
    let mut text = format!(
        "fleet {}: {} in {:.1} s",
        event.request_id,
        counts_text(fleet.count, &counts),
        elapsed.as_secs_f64()
    );
    let members = event
        .resource
        .as_ref()
        .map(|r| r.members.as_slice())
        .unwrap_or_default();
    let failed: Vec<_> = members.iter().filter(|m| m.error.is_some()).collect();
    const SHOWN: usize = 10;
    for member in failed.iter().take(SHOWN) {
        if let Some(error) = &member.error {
            text.push_str(&format!(
                "\n  member {} ({}) failed, {}: {}",
                member.index, member.request_id, error.class, error.message
            ));
        }
    }
    if failed.len() > SHOWN {
        text.push_str(&format!(
            "\n  … and {} more failed members",
            failed.len() - SHOWN
        ));
    }
    Some(text)
}

fn short_id(id: &str) -> &str {
    &id[..id.len().min(12)]
}

pub async fn run(connections: &Connections, args: SubmitArgs) -> Result<ExitCode, Failure> {
    let requests = read_requests(&args.file)?;
    let signing = connections.signing_keys()?;
    if connections.embedded()? {
        return embedded(args, requests, signing).await;
    }
    let broker = crate::amqp(connections, "provisioner-submit").await?;
    // Declaring the platforms' queues makes requests wait for a worker that is not up yet.
    for platform in platforms_of(&requests) {
        broker
            .declare(platform)
            .await
            .with_context(|| format!("declaring the {platform} queue"))?;
    }
    publish_and_wait(&broker, requests, args.wait, &args, signing.as_deref()).await
}

fn platforms_of(requests: &[Outgoing]) -> BTreeSet<PlatformName> {
    requests.iter().map(|o| o.request.platform).collect()
}

fn acts_on_existing(operation: Operation) -> bool {
    !matches!(operation, Operation::Provision)
}

/// Publishes each request (signed with `signing`'s first key, when given) and, with
/// `wait`, follows them to their ends.
async fn publish_and_wait(
    broker: &dyn Broker,
    requests: Vec<Outgoing>,
    wait: bool,
    args: &SubmitArgs,
    signing: Option<&provisioner_core::signing::SigningKeys>,
) -> Result<ExitCode, Failure> {
    // Subscribe before publishing, so no event can come before we listen.
    let mut events = if wait {
        Some(
            broker
                .subscribe_status()
                .await
                .context("subscribing to the status topic")?,
        )
    } else {
        None
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_seconds);
    let mut outcome: HashMap<String, Option<StatusEvent>> = HashMap::new();
    let mut bodies: HashMap<String, Vec<u8>> = HashMap::new();
    for outgoing in requests {
        let id = outgoing.request.request_id.to_string();
        if let Some(events) = events.as_mut()
            && acts_on_existing(outgoing.request.operation)
        {
            follow(events, &mut outcome, &bodies, deadline, args.json).await?;
        }
        bodies.insert(id.clone(), outgoing.body.clone());
        // The request's trace starts here: its `traceparent` names this span.
        let span = tracing::info_span!("submit", request.id = %id);
        let trace = provisioner_core::trace::continue_trace(&span, &Default::default());
        let routing_key = outgoing.request.routing_key();
        let mut headers = std::collections::BTreeMap::new();
        if let Some(keys) = signing {
            headers.insert(
                provisioner_core::signing::SIGNATURE_HEADER.to_owned(),
                keys.sign(&routing_key, &outgoing.body),
            );
        }
        broker
            .publish_request_with_headers(&routing_key, &id, &outgoing.body, &headers)
            .instrument(span)
            .await
            .with_context(|| format!("publishing {id}"))?;
        match trace {
            Some(trace) => eprintln!(
                "published {id} ({}, trace {trace})",
                outgoing.request.routing_key()
            ),
            None => eprintln!("published {id} ({})", outgoing.request.routing_key()),
        }
        outcome.entry(id).or_insert(None);
    }
    let Some(mut events) = events else {
        return Ok(ExitCode::SUCCESS);
    };
    follow(&mut events, &mut outcome, &bodies, deadline, args.json).await?;
    let failed: Vec<&String> = outcome
        .iter()
        .filter(|(_, event)| event.as_ref().is_some_and(|e| e.state == State::Error))
        .map(|(id, _)| id)
        .collect();
    if failed.is_empty() {
        eprintln!("all {} request(s) ended well", outcome.len());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{} of {} request(s) ended in error",
            failed.len(),
            outcome.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

/// Prints events of our requests until every one of them has a terminal event. An event
/// that answers only another message under one of our ids (someone reused the id with
/// another body) is not our request's outcome.
async fn follow(
    events: &mut BoxStream<'static, StatusEvent>,
    outcome: &mut HashMap<String, Option<StatusEvent>>,
    bodies: &HashMap<String, Vec<u8>>,
    deadline: tokio::time::Instant,
    json: bool,
) -> Result<(), Failure> {
    // When each request's first event came, for a fleet's time; and whether a fleet's
    // progress is drawn as a bar (on a terminal) or printed line by line.
    let mut started: HashMap<String, tokio::time::Instant> = HashMap::new();
    let progress_bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
    while outcome.values().any(Option::is_none) {
        let event = match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) => event,
            Ok(None) => {
                return Err(Failure::unavailable(anyhow!(
                    "the status stream ended (connection lost)"
                )));
            }
            Err(_) => {
                let waiting: Vec<&String> = outcome
                    .iter()
                    .filter(|(_, e)| e.is_none())
                    .map(|(id, _)| id)
                    .collect();
                return Err(Failure {
                    code: EXIT_TEMPFAIL,
                    error: anyhow!("timed out waiting for {waiting:?}"),
                });
            }
        };
        let Some(slot) = outcome.get_mut(&event.request_id) else {
            continue;
        };
        let ours = bodies
            .get(&event.request_id)
            .is_none_or(|body| event.answers(body));
        if !ours {
            if !json {
                eprintln!(
                    "note: another message under request_id {} was refused; it does not change this request",
                    event.request_id
                );
            }
            continue;
        }
        let fleet_progress = event.fleet.as_ref().is_some_and(|f| f.index.is_none());
        let since = *started
            .entry(event.request_id.clone())
            .or_insert_with(tokio::time::Instant::now);
        if fleet_progress && !json && !event.state.is_terminal() && progress_bar {
            draw_progress(&event, since);
            continue;
        }
        if fleet_progress && progress_bar && !json {
            eprintln!();
        }
        print_event(&event, json);
        if event.state.is_terminal() && slot.is_none() {
            if !json && let Some(summary) = fleet_summary(&event, since.elapsed()) {
                eprintln!("{summary}");
            }
            *slot = Some(event);
        }
    }
    Ok(())
}

/// Everything in this process: an in-memory broker and store, and a worker for each
/// platform the requests name.
/// With signing keys set it behaves as a signing deployment does: each request is signed
/// with the first key and the workers run only what verifies.
async fn embedded(
    args: SubmitArgs,
    requests: Vec<Outgoing>,
    signing: Option<Arc<provisioner_core::signing::SigningKeys>>,
) -> Result<ExitCode, Failure> {
    eprintln!(
        "no AMQP_URL/REDIS_URL: running embedded (in-process broker, state store and workers)"
    );
    let broker = Arc::new(MemoryBroker::new());
    let store = Arc::new(MemoryStore::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    let settings = args.platforms.registry_settings(true)?;
    for platform_name in platforms_of(&requests) {
        let platform = build_platform(platform_name, &settings)
            .await
            .map_err(|failure| match platform_name {
                PlatformName::Docker => Failure {
                    code: failure.code,
                    error: anyhow!(
                        "{} (the docker requests need an engine; the process examples need nothing)",
                        failure.error
                    ),
                },
                _ => failure,
            })?;
        let config = WorkerConfig {
            worker_id: format!("embedded-{platform_name}"),
            signing: signing.clone(),
            ..WorkerConfig::default()
        };
        let worker = Arc::new(Worker::new(platform, store.clone(), broker.clone(), config));
        let mut stop = stop_rx.clone();
        workers.push(tokio::spawn(worker.run(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })));
    }
    let result = publish_and_wait(broker.as_ref(), requests, true, &args, signing.as_deref()).await;
    let _ = stop_tx.send(true);
    for worker in workers {
        let _ = worker.await;
    }
    result
}
