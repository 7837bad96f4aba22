//! The broker topology, described once ([`Topology`]) and used two ways: declared
//! idempotently by every client (the exchanges and the status journal on connecting, a
//! platform's work queue, delay tiers and dead-letter queue before consuming or
//! publishing), and written out as RabbitMQ definitions for an operator to load
//! ([`Topology::definitions`], `provisioner definitions`). One description, so the two
//! cannot drift.
//!
//! Settings an operator may want to change later (the work queues' delivery limit and
//! dead-lettering, the journal's length) are RabbitMQ *policies*, not queue arguments: a
//! queue's arguments are fixed for its life, while a policy changes in place
//! (`rabbitmqctl set_policy`, the management API) on queues that keep their messages.
//! Queues are declared with their structural arguments only (the quorum type; a delay
//! tier's TTL and way back, which are its identity). The declaring client creates the
//! missing policies through the management API ([`super::policies`]) and never changes
//! one that exists. Where it cannot (no management API, a user without the right), it
//! declares the queues it creates with the policies' settings as arguments, so a worker
//! on an empty broker still dead-letters its poison messages.
//!
//! Each declaration runs on a channel of its own, since a refused declaration closes its
//! channel.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use provisioner_events::{PlatformName, REQUESTS_EXCHANGE, STATUS_EXCHANGE};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use super::policies::{self, ManagementApi, Policies};
use super::{
    AmqpConfig, DEAD_LETTER_EXCHANGE, DELAY_EXCHANGE, INTERNAL_EXCHANGE, RETRY_TIERS_S,
    STATUS_JOURNAL_QUEUE, UNROUTED_EXCHANGE, UNROUTED_QUEUE, dead_letter_queue, retry_queue, short,
    unavailable, work_queue,
};
use crate::broker::BrokerError;

/// An argument of an exchange or queue, typed as the code declares it.
#[derive(Debug, Clone, PartialEq)]
pub enum Argument {
    Text(String),
    Int(i32),
    Long(i64),
}

impl Argument {
    fn text(value: &str) -> Self {
        Argument::Text(value.to_owned())
    }

    fn amqp(&self) -> AMQPValue {
        match self {
            Argument::Text(text) => AMQPValue::LongString(text.as_str().into()),
            Argument::Int(n) => AMQPValue::LongInt(*n),
            Argument::Long(n) => AMQPValue::LongLongInt(*n),
        }
    }

    fn json(&self) -> Value {
        match self {
            Argument::Text(text) => json!(text),
            Argument::Int(n) => json!(n),
            Argument::Long(n) => json!(n),
        }
    }
}

/// Arguments in declaration order.
pub type Arguments = Vec<(&'static str, Argument)>;

fn field_table(arguments: &Arguments) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in arguments {
        table.insert((*name).into(), value.amqp());
    }
    table
}

fn json_arguments(arguments: &Arguments) -> Value {
    Value::Object(
        arguments
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.json()))
            .collect(),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Topic,
    Fanout,
}

impl ExchangeType {
    fn name(self) -> &'static str {
        match self {
            ExchangeType::Topic => "topic",
            ExchangeType::Fanout => "fanout",
        }
    }
}

/// A durable exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub name: String,
    pub kind: ExchangeType,
    pub arguments: Arguments,
}

/// A durable queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    pub name: String,
    /// Its structural arguments, fixed for its life.
    pub arguments: Arguments,
    /// The policy holding its tunable settings, by name.
    pub policy: Option<String>,
}

/// A RabbitMQ policy: settings of every queue whose name matches `pattern`, changeable
/// at any time without redeclaring them. Only the policy of highest priority applies to
/// a queue (policies do not merge; operator policies do).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    /// A regular expression over queue names.
    pub pattern: String,
    pub priority: i32,
    /// Keys as RabbitMQ's policies name them (`delivery-limit`); each is also a queue
    /// argument with an `x-` prefix, the form used where the policy cannot be set.
    pub definition: Arguments,
}

impl Policy {
    /// The policy as RabbitMQ definitions and the management API write it.
    pub fn definition_json(&self, vhost: &str) -> Value {
        json!({
            "vhost": vhost, "name": self.name, "pattern": self.pattern, "apply-to": "queues",
            "priority": self.priority, "definition": json_arguments(&self.definition),
        })
    }

    /// The definition as queue arguments (`x-delivery-limit`, …).
    pub fn as_arguments(&self) -> Arguments {
        self.definition
            .iter()
            .map(|(key, value)| (argument_name(key), value.clone()))
            .collect()
    }
}

/// The queue argument of a policy key: the same name with `x-`.
fn argument_name(key: &'static str) -> &'static str {
    match key {
        "delivery-limit" => "x-delivery-limit",
        "dead-letter-exchange" => "x-dead-letter-exchange",
        "dead-letter-routing-key" => "x-dead-letter-routing-key",
        "dead-letter-strategy" => "x-dead-letter-strategy",
        "overflow" => "x-overflow",
        "max-length" => "x-max-length",
        "max-length-bytes" => "x-max-length-bytes",
        "message-ttl" => "x-message-ttl",
        other => panic!("no queue argument for the policy key {other:?}"),
    }
}

/// The policy of a platform's work queue: poison messages (crash loops, panics)
/// dead-lettered after `delivery-limit` deliveries, at least once; the queue bounded in
/// messages and bytes, refusing publishes past either. One per platform, so
/// each can be tuned alone and a worker never depends on a policy written by an older
/// version that did not know its platform.
pub fn work_policy_name(platform: PlatformName) -> String {
    format!("provisioner-work-{platform}")
}

/// The policy of the status journal: its length, oldest events dropped first.
pub const JOURNAL_POLICY: &str = "provisioner-status-journal";
/// Priority of the shipped policies: above a catch-all policy of priority 0.
const POLICY_PRIORITY: i32 = 10;

/// A queue bound to an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
}

/// Exchanges, queues, bindings and the policies of the queues, in the order they are
/// declared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Topology {
    pub exchanges: Vec<Exchange>,
    pub queues: Vec<Queue>,
    pub bindings: Vec<Binding>,
    /// Bindings of older versions that this one removes where its user may (definitions
    /// cannot remove a binding: the README says how an operator does).
    pub retired_bindings: Vec<Binding>,
    pub policies: Vec<Policy>,
}

fn quorum(mut extra: Arguments) -> Arguments {
    let mut arguments = vec![("x-queue-type", Argument::text("quorum"))];
    arguments.append(&mut extra);
    arguments
}

/// Dead-letters at least once: the message leaves the queue only when the target queue
/// confirmed it. RabbitMQ honours it only with `reject-publish` overflow.
fn at_least_once() -> Arguments {
    vec![
        ("dead-letter-strategy", Argument::text("at-least-once")),
        ("overflow", Argument::text("reject-publish")),
    ]
}

/// A regular expression matching exactly the queue `name`.
fn exactly(name: &str) -> String {
    format!("^{}$", name.replace('.', "\\."))
}

/// The most messages a work queue holds before the broker refuses publishes to it
/// (`overflow: reject-publish`: a producer's publish is nacked, nothing is dropped).
pub const WORK_QUEUE_MAX_LENGTH: i64 = 1_000_000;
/// The most bytes of message bodies a work queue holds, likewise: a flood of large
/// messages cannot fill the broker's disk and raise the alarm that stops every publisher.
pub const WORK_QUEUE_MAX_BYTES: i64 = 1 << 30;

/// The most messages a side queue (a platform's dead letters and delay tiers, the
/// unrouted requests) holds before the broker refuses what would go there: a flood of
/// refused or parked messages then backs up into the bounded work queue (a dead letter
/// or a parked retry the broker refuses stays where it was), and never fills the disk.
pub const SIDE_QUEUE_MAX_LENGTH: i64 = 100_000;
/// The most bytes of message bodies a side queue holds, likewise.
pub const SIDE_QUEUE_MAX_BYTES: i64 = 256 << 20;
/// The most bytes of events the journal keeps (its oldest are dropped past it, as past
/// its length).
pub const JOURNAL_MAX_BYTES: i64 = 64 << 20;

/// The name of the policy bounding `platform`'s dead-letter and delay queues.
pub fn side_policy_name(platform: PlatformName) -> String {
    format!("provisioner-side-{platform}")
}

/// The name of the policy bounding the unrouted requests' queue.
pub const UNROUTED_POLICY: &str = "provisioner-unrouted";

/// The bounds of a side queue: length and bytes, publishes refused past them.
fn side_bounds() -> Arguments {
    vec![
        ("max-length", Argument::Long(SIDE_QUEUE_MAX_LENGTH)),
        ("max-length-bytes", Argument::Long(SIDE_QUEUE_MAX_BYTES)),
        ("overflow", Argument::text("reject-publish")),
    ]
}

/// The policy of `platform`'s dead-letter queue and delay tiers.
fn side_policy(platform: PlatformName) -> Policy {
    Policy {
        name: side_policy_name(platform),
        pattern: format!(
            "^provisioning\\.{}\\.(dead-letter|delay\\.[0-9]+s)$",
            platform.as_str().replace('.', "\\.")
        ),
        priority: POLICY_PRIORITY,
        definition: side_bounds(),
    }
}

/// The policy of `platform`'s work queue.
fn work_policy(config: &AmqpConfig, platform: PlatformName) -> Policy {
    let mut definition = vec![
        ("delivery-limit", Argument::Int(config.delivery_limit)),
        ("dead-letter-exchange", Argument::text(DEAD_LETTER_EXCHANGE)),
        ("max-length", Argument::Long(WORK_QUEUE_MAX_LENGTH)),
        ("max-length-bytes", Argument::Long(WORK_QUEUE_MAX_BYTES)),
    ];
    definition.extend(at_least_once());
    Policy {
        name: work_policy_name(platform),
        pattern: exactly(&work_queue(platform)),
        priority: POLICY_PRIORITY,
        definition,
    }
}

impl Topology {
    /// What every client needs: the requests, status and dead-letter exchanges, the
    /// unrouted requests' exchange and queue, and the status journal.
    pub fn shared(config: &AmqpConfig) -> Topology {
        let exchange = |name: &str, kind, arguments| Exchange {
            name: name.to_owned(),
            kind,
            arguments,
        };
        Topology {
            exchanges: vec![
                exchange(UNROUTED_EXCHANGE, ExchangeType::Fanout, vec![]),
                exchange(
                    REQUESTS_EXCHANGE,
                    ExchangeType::Topic,
                    vec![("alternate-exchange", Argument::text(UNROUTED_EXCHANGE))],
                ),
                exchange(STATUS_EXCHANGE, ExchangeType::Topic, vec![]),
                exchange(DEAD_LETTER_EXCHANGE, ExchangeType::Topic, vec![]),
                exchange(INTERNAL_EXCHANGE, ExchangeType::Topic, vec![]),
                exchange(DELAY_EXCHANGE, ExchangeType::Topic, vec![]),
            ],
            queues: vec![
                Queue {
                    name: UNROUTED_QUEUE.to_owned(),
                    arguments: quorum(vec![]),
                    policy: Some(UNROUTED_POLICY.to_owned()),
                },
                Queue {
                    name: STATUS_JOURNAL_QUEUE.to_owned(),
                    arguments: vec![],
                    policy: Some(JOURNAL_POLICY.to_owned()),
                },
            ],
            bindings: vec![Binding {
                exchange: UNROUTED_EXCHANGE.to_owned(),
                queue: UNROUTED_QUEUE.to_owned(),
                routing_key: String::new(),
            }]
            .into_iter()
            // The journal keeps events: each platform's keys, never the probe's (or
            // anything else published on the status exchange), which would push events
            // out of it.
            .chain(PlatformName::ALL.into_iter().map(|platform| Binding {
                exchange: STATUS_EXCHANGE.to_owned(),
                queue: STATUS_JOURNAL_QUEUE.to_owned(),
                routing_key: format!("{platform}.*"),
            }))
            .collect(),
            retired_bindings: vec![Binding {
                exchange: STATUS_EXCHANGE.to_owned(),
                queue: STATUS_JOURNAL_QUEUE.to_owned(),
                routing_key: "#".to_owned(),
            }],
            policies: vec![
                Policy {
                    name: JOURNAL_POLICY.to_owned(),
                    pattern: exactly(STATUS_JOURNAL_QUEUE),
                    priority: POLICY_PRIORITY,
                    definition: vec![
                        ("max-length", Argument::Long(config.journal_max_length)),
                        ("max-length-bytes", Argument::Long(JOURNAL_MAX_BYTES)),
                        ("overflow", Argument::text("drop-head")),
                    ],
                },
                Policy {
                    name: UNROUTED_POLICY.to_owned(),
                    pattern: exactly(UNROUTED_QUEUE),
                    priority: POLICY_PRIORITY,
                    definition: side_bounds(),
                },
            ],
        }
    }

    /// A platform's queues: the work queue (first), its dead letters and its delay tiers.
    pub fn platform(config: &AmqpConfig, platform: PlatformName) -> Topology {
        let work = work_queue(platform);
        let dead = dead_letter_queue(platform);
        let binding = |exchange: &str, queue: &str, routing_key: String| Binding {
            exchange: exchange.to_owned(),
            queue: queue.to_owned(),
            routing_key,
        };
        let mut queues = vec![
            Queue {
                name: work.clone(),
                arguments: quorum(vec![]),
                policy: Some(work_policy_name(platform)),
            },
            Queue {
                name: dead.clone(),
                arguments: quorum(vec![]),
                policy: Some(side_policy_name(platform)),
            },
        ];
        let mut bindings = vec![
            binding(REQUESTS_EXCHANGE, &work, format!("{platform}.*")),
            binding(INTERNAL_EXCHANGE, &work, format!("{platform}.*")),
            binding(DEAD_LETTER_EXCHANGE, &dead, format!("{platform}.#")),
            // Messages that came back from a delay queue carry the work queue's name
            // as their key.
            binding(DEAD_LETTER_EXCHANGE, &dead, work.clone()),
        ];
        for tier in RETRY_TIERS_S {
            let delay = retry_queue(platform, tier);
            bindings.push(binding(DELAY_EXCHANGE, &delay, delay.clone()));
            // A tier's TTL and its way back to the work queue are what the tier is
            // (the worker picks a tier by its delay), not settings to tune: arguments.
            let mut arguments = quorum(vec![
                ("x-message-ttl", Argument::Long((tier * 1000) as i64)),
                ("x-dead-letter-exchange", Argument::text("")),
                ("x-dead-letter-routing-key", Argument::text(&work)),
            ]);
            arguments.extend(
                at_least_once()
                    .into_iter()
                    .map(|(key, value)| (argument_name(key), value)),
            );
            queues.push(Queue {
                name: delay,
                arguments,
                policy: Some(side_policy_name(platform)),
            });
        }
        Topology {
            exchanges: vec![],
            queues,
            bindings,
            retired_bindings: vec![],
            policies: vec![work_policy(config, platform), side_policy(platform)],
        }
    }

    /// The shared topology and that of every platform.
    pub fn everything(config: &AmqpConfig) -> Topology {
        let mut all = Topology::shared(config);
        for platform in PlatformName::ALL {
            let mut of_platform = Topology::platform(config, platform);
            all.exchanges.append(&mut of_platform.exchanges);
            all.queues.append(&mut of_platform.queues);
            all.bindings.append(&mut of_platform.bindings);
            all.retired_bindings
                .append(&mut of_platform.retired_bindings);
            all.policies.append(&mut of_platform.policies);
        }
        all
    }

    /// The policy named `name`.
    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|policy| policy.name == name)
    }

    /// The topology as RabbitMQ definitions of `vhost` (the `exchanges`, `queues` and
    /// `bindings` of `rabbitmqctl export_definitions`), for `import_definitions` or the
    /// management API's `POST /api/definitions`.
    pub fn definitions(&self, vhost: &str) -> Value {
        json!({
            "vhosts": [{"name": vhost}],
            "exchanges": self.exchanges.iter().map(|e| json!({
                "name": e.name, "vhost": vhost, "type": e.kind.name(), "durable": true,
                "auto_delete": false, "internal": false, "arguments": json_arguments(&e.arguments),
            })).collect::<Vec<_>>(),
            "queues": self.queues.iter().map(|q| json!({
                "name": q.name, "vhost": vhost, "durable": true, "auto_delete": false,
                "arguments": json_arguments(&q.arguments),
            })).collect::<Vec<_>>(),
            "bindings": self.bindings.iter().map(|b| json!({
                "source": b.exchange, "vhost": vhost, "destination": b.queue,
                "destination_type": "queue", "routing_key": b.routing_key, "arguments": {},
            })).collect::<Vec<_>>(),
            "policies": self.policies.iter().map(|p| p.definition_json(vhost)).collect::<Vec<_>>(),
        })
    }
}

/// The broker users of a least-privilege deployment and what each may do on `vhost`,
/// as RabbitMQ definitions (`users`, `permissions`, `topic_permissions`):
///
/// - `provisioner-producer` publishes requests and follows the status topic on queues
///   of its own; it may publish nothing else (on the status exchange only the probe
///   that proves its subscription hears).
/// - `provisioner-worker-<platform>`, one per platform, consumes its platform's work
///   queue and publishes status events (under its platform's keys only), dead letters
///   and parked retries of its platform, and the requests it derives (fleet members, expiry teardowns) on
///   `provisioning.internal` for its platform only. It may not publish on
///   `provisioning.requests`, nor through the default exchange to any queue.
/// - `provisioner-operator` may do everything on the vhost (redrive, reconcile, reading
///   the journal and the dead letters).
///
/// None of them may declare: the operator loads the topology with the definitions.
/// Users come without passwords; set them with `rabbitmqctl change_password`.
pub fn access_definitions(vhost: &str, platforms: &[PlatformName]) -> Value {
    let user = |name: &str, tags: &[&str]| json!({"name": name, "password_hash": "", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": tags, "limits": {}});
    let permission = |name: &str, configure: &str, write: &str, read: &str| json!({"user": name, "vhost": vhost, "configure": configure, "write": write, "read": read});
    let topic = |name: &str, exchange: &str, write: &str| json!({"user": name, "vhost": vhost, "exchange": exchange, "write": write, "read": ".*"});
    let escape = |name: &str| name.replace('.', "\\.");
    let producer = "provisioner-producer";
    let operator = "provisioner-operator";
    let mut users = vec![user(producer, &[]), user(operator, &["management"])];
    let mut permissions = vec![
        permission(
            producer,
            "^amq\\.gen-.*$",
            &format!(
                "^({}|{}|amq\\.gen-.*)$",
                escape(REQUESTS_EXCHANGE),
                escape(STATUS_EXCHANGE)
            ),
            &format!("^({}|amq\\.gen-.*)$", escape(STATUS_EXCHANGE)),
        ),
        permission(operator, ".*", ".*", ".*"),
    ];
    let mut topic_permissions = vec![topic(
        producer,
        STATUS_EXCHANGE,
        &format!("^{}$", escape(super::PROBE_ROUTING_KEY)),
    )];
    for platform in platforms {
        let worker = format!("provisioner-worker-{platform}");
        users.push(user(&worker, &[]));
        permissions.push(permission(
            &worker,
            "^$",
            &format!(
                "^({}|{}|{}|{})$",
                escape(STATUS_EXCHANGE),
                escape(DEAD_LETTER_EXCHANGE),
                escape(INTERNAL_EXCHANGE),
                escape(DELAY_EXCHANGE)
            ),
            &format!("^{}$", escape(&work_queue(*platform))),
        ));
        topic_permissions.extend([
            topic(
                &worker,
                DEAD_LETTER_EXCHANGE,
                &format!("^({platform}\\..*|{})$", escape(&work_queue(*platform))),
            ),
            topic(&worker, INTERNAL_EXCHANGE, &format!("^{platform}\\.[^.]+$")),
            // Its own platform's status keys only: a subscriber binds the event's body to
            // its key, so one platform's worker cannot speak for another's requests.
            topic(&worker, STATUS_EXCHANGE, &format!("^{platform}\\.[a-z_]+$")),
            topic(
                &worker,
                DELAY_EXCHANGE,
                &format!("^{}\\.delay\\.[0-9]+s$", escape(&work_queue(*platform))),
            ),
        ]);
    }
    json!({"users": users, "permissions": permissions, "topic_permissions": topic_permissions})
}

/// The whole definitions of `vhost`: every platform's topology and the users of a
/// least-privilege deployment (`infra/rabbitmq/definitions.json` is this on `/`).
pub fn definitions(config: &AmqpConfig, vhost: &str) -> Value {
    let mut all = Topology::everything(config).definitions(vhost);
    if let (Value::Object(all), Value::Object(access)) =
        (&mut all, access_definitions(vhost, &PlatformName::ALL))
    {
        all.extend(access);
    }
    all
}

/// Declares on a channel of its own, making a new one after each refusal (a refusal
/// closes its channel). A client whose broker user may not declare (a least-privilege
/// deployment, where the operator loaded the definitions) checks instead that what it
/// would declare exists.
struct Declarer<'a> {
    connection: &'a Connection,
    channel: Channel,
}

fn access_refused(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))
    )
}

fn missing(what: &str, name: &str, refusal: &lapin::Error) -> BrokerError {
    BrokerError::Refused(format!(
        "this broker user may not declare the {what} {name:?} ({refusal}) and it does not exist: load the definitions (`provisioner definitions`, infra/rabbitmq/definitions.json) or grant the user configure rights"
    ))
}

impl<'a> Declarer<'a> {
    async fn new(connection: &'a Connection) -> Result<Declarer<'a>, BrokerError> {
        let channel = connection.create_channel().await.map_err(unavailable)?;
        Ok(Declarer {
            connection,
            channel,
        })
    }

    /// A fresh channel after a refusal closed the current one.
    async fn reopen(&mut self) -> Result<(), BrokerError> {
        self.channel = self
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn exchange(&mut self, exchange: &Exchange) -> Result<(), BrokerError> {
        let kind = match exchange.kind {
            ExchangeType::Topic => ExchangeKind::Topic,
            ExchangeType::Fanout => ExchangeKind::Fanout,
        };
        let declared = self
            .channel
            .exchange_declare(
                short(&exchange.name)?,
                kind.clone(),
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                field_table(&exchange.arguments),
            )
            .await;
        match declared {
            Err(e) if access_refused(&e) => {
                self.reopen().await?;
                let checked = self
                    .channel
                    .exchange_declare(
                        short(&exchange.name)?,
                        kind,
                        ExchangeDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                if checked.is_err() {
                    self.reopen().await?;
                    return Err(missing("exchange", &exchange.name, &e));
                }
                Ok(())
            }
            declared => declared.map_err(unavailable),
        }
    }

    /// Declares a queue with `arguments`. A queue that exists with other arguments (an
    /// older version's, or declared while the policies were out of reach) is used as it
    /// is; `policies_in_place` says whether that deserves a warning.
    async fn queue(
        &mut self,
        queue: &Queue,
        arguments: &Arguments,
        policies_in_place: bool,
    ) -> Result<(), BrokerError> {
        let declared = self
            .channel
            .queue_declare(
                short(&queue.name)?,
                QueueDeclareOptions::durable(),
                field_table(arguments),
            )
            .await;
        let refusal = match declared {
            Ok(_) => return Ok(()),
            Err(e) if e.is_amqp_soft_error() => e,
            Err(e) => return Err(unavailable(e)),
        };
        self.reopen().await?;
        let checked = self
            .channel
            .queue_declare(
                short(&queue.name)?,
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await;
        if checked.is_err() {
            self.reopen().await?;
            return Err(if access_refused(&refusal) {
                missing("queue", &queue.name, &refusal)
            } else {
                BrokerError::Refused(refusal.to_string())
            });
        }
        if access_refused(&refusal) {
            return Ok(());
        }
        match &queue.policy {
            Some(policy) if policies_in_place => warn!(
                queue = %queue.name,
                error = %refusal,
                "the queue exists with other arguments (declared by an older version, or while the policies were out of reach); using it as it is. Its arguments win over the policy {policy:?} (RabbitMQ takes the lower of two limits, and the argument otherwise): to let the policy govern it, delete the queue when it is empty and start a worker"
            ),
            _ => {
                debug!(queue = %queue.name, error = %refusal, "the queue exists with other arguments; using it as it is")
            }
        }
        Ok(())
    }

    /// Binds; a user that may not bind relies on the definitions' binding (AMQP has no
    /// way to look a binding up).
    async fn binding(&mut self, binding: &Binding) -> Result<(), BrokerError> {
        let bound = self
            .channel
            .queue_bind(
                short(&binding.queue)?,
                short(&binding.exchange)?,
                short(&binding.routing_key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        match bound {
            Err(e) if access_refused(&e) => {
                debug!(queue = %binding.queue, exchange = %binding.exchange, "may not bind; relying on the definitions");
                self.reopen().await
            }
            bound => bound.map_err(unavailable),
        }
    }

    /// Removes an older version's binding; a user that may not leaves it to the operator.
    async fn unbind(&mut self, binding: &Binding) -> Result<(), BrokerError> {
        let unbound = self
            .channel
            .queue_unbind(
                short(&binding.queue)?,
                short(&binding.exchange)?,
                short(&binding.routing_key)?,
                FieldTable::default(),
            )
            .await;
        match unbound {
            Ok(()) => Ok(()),
            Err(e) if e.is_amqp_soft_error() => {
                debug!(queue = %binding.queue, exchange = %binding.exchange, key = %binding.routing_key, error = %e, "could not remove an older version's binding; the operator removes it");
                self.reopen().await
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Declares `topology`: its policies first, then its exchanges, queues and
    /// bindings. Where the policies cannot be put in place, a queue is declared with
    /// its policy's settings as arguments, so it is safe without them.
    async fn topology(
        &mut self,
        config: &AmqpConfig,
        topology: &Topology,
    ) -> Result<(), BrokerError> {
        let policies = policies::ensure(config, &topology.policies).await;
        if let Policies::OutOfReach(why) = &policies
            && config.management_api != ManagementApi::Off
        {
            // With the API off, the operator said the policies are theirs to load.
            info!(
                policies = ?topology.policies.iter().map(|p| &p.name).collect::<Vec<_>>(),
                "could not check the queue policies through the management API ({why}); a queue declared now carries their settings as arguments, which a policy cannot change later. Load the definitions (`provisioner definitions`) or set RABBITMQ_MANAGEMENT_URL"
            );
        }
        for exchange in &topology.exchanges {
            self.exchange(exchange).await?;
        }
        for queue in &topology.queues {
            let mut arguments = queue.arguments.clone();
            if policies != Policies::InPlace
                && let Some(policy) = queue.policy.as_deref().and_then(|p| topology.policy(p))
            {
                arguments.extend(policy.as_arguments());
            }
            self.queue(queue, &arguments, policies == Policies::InPlace)
                .await?;
        }
        for binding in &topology.bindings {
            self.binding(binding).await?;
        }
        for binding in &topology.retired_bindings {
            self.unbind(binding).await?;
        }
        let _ = self.channel.close(200, "OK".into()).await;
        Ok(())
    }
}

/// Declares what every client needs (the exchanges and the status journal).
pub(super) async fn declare_shared(
    connection: &Connection,
    config: &AmqpConfig,
) -> Result<(), BrokerError> {
    Declarer::new(connection)
        .await?
        .topology(config, &Topology::shared(config))
        .await
}

/// Declares a platform's queues and their bindings.
pub(super) async fn declare_platform(
    connection: &Connection,
    config: &AmqpConfig,
    platform: PlatformName,
) -> Result<(), BrokerError> {
    Declarer::new(connection)
        .await?
        .topology(config, &Topology::platform(config, platform))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_platforms_topology_routes_its_requests_to_its_work_queue_and_its_refusals_aside() {
        let config = AmqpConfig::new("amqp://unused");
        let docker = Topology::platform(&config, PlatformName::Docker);
        assert_eq!(docker.queues[0].name, "provisioning.docker");
        // The work queue's tunables are its policy's, not fixed arguments.
        assert_eq!(docker.queues[0].arguments, quorum(vec![]));
        let policy = docker
            .policy(docker.queues[0].policy.as_deref().expect("a policy"))
            .expect("the policy is in the topology");
        assert_eq!(policy.pattern, "^provisioning\\.docker$");
        assert!(policy.as_arguments().contains(&(
            "x-dead-letter-exchange",
            Argument::text(DEAD_LETTER_EXCHANGE)
        )));
        assert_eq!(docker.queues.len(), 2 + RETRY_TIERS_S.len());
        assert!(docker.bindings.contains(&Binding {
            exchange: REQUESTS_EXCHANGE.into(),
            queue: "provisioning.docker".into(),
            routing_key: "docker.*".into(),
        }));
        let all = Topology::everything(&config);
        assert_eq!(
            all.queues.len(),
            2 + PlatformName::ALL.len() * (2 + RETRY_TIERS_S.len())
        );
        let definitions = all.definitions("/");
        assert_eq!(
            definitions["queues"][0]["arguments"]["x-queue-type"],
            "quorum"
        );
        assert_eq!(
            definitions["exchanges"][1]["arguments"]["alternate-exchange"],
            UNROUTED_EXCHANGE
        );
        let work_policy = definitions["policies"]
            .as_array()
            .expect("policies")
            .iter()
            .find(|p| p["name"] == work_policy_name(PlatformName::Docker))
            .expect("docker's work policy");
        assert_eq!(
            work_policy["definition"]["dead-letter-strategy"],
            "at-least-once"
        );
    }

    /// Every queue with a policy is matched by it and by no other of the topology's
    /// policies; a policy matches only its queues. Checked with a regular expression
    /// engine as RabbitMQ reads patterns (whole-name anchors, escaped dots).
    #[test]
    fn each_policy_governs_exactly_its_queues() {
        let all = Topology::everything(&AmqpConfig::new("amqp://unused"));
        assert_eq!(all.policies.len(), 2 + 2 * PlatformName::ALL.len());
        for policy in &all.policies {
            let pattern = regex_lite::Regex::new(&policy.pattern).expect("a valid pattern");
            let matched: Vec<&str> = all
                .queues
                .iter()
                .filter(|queue| pattern.is_match(&queue.name))
                .map(|queue| queue.name.as_str())
                .collect();
            let governed: Vec<&str> = all
                .queues
                .iter()
                .filter(|queue| queue.policy.as_deref() == Some(policy.name.as_str()))
                .map(|queue| queue.name.as_str())
                .collect();
            assert_eq!(matched, governed, "policy {}", policy.name);
            assert!(!governed.is_empty(), "policy {}", policy.name);
        }
        // Every queue is bounded in messages and bytes.
        for queue in &all.queues {
            let policy = queue
                .policy
                .as_deref()
                .and_then(|name| all.policy(name))
                .unwrap_or_else(|| panic!("{} has no policy", queue.name));
            for bound in ["max-length", "max-length-bytes", "overflow"] {
                assert!(
                    policy.definition.iter().any(|(key, _)| *key == bound),
                    "{} is not bounded by {bound}",
                    queue.name
                );
            }
        }
    }

    /// `infra/rabbitmq/definitions.json` is what the code declares, on the default vhost.
    /// `UPDATE_GOLDEN=1` rewrites it after an intended change.
    #[test]
    fn the_definitions_in_infra_are_the_topology_the_code_declares() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../infra/rabbitmq/definitions.json"
        );
        let generated = definitions(&AmqpConfig::new("amqp://unused"), "/");
        let text = format!(
            "{}\n",
            serde_json::to_string_pretty(&generated).expect("JSON")
        );
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &text).expect("write the definitions");
        }
        let kept = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            kept == text,
            "{path} differs from the topology the code declares; if the change is intended, run `UPDATE_GOLDEN=1 cargo test -p provisioner-core --lib definitions` and commit the file"
        );
    }
}
