//! Declarations: the exchanges and the status journal every client needs, and a
//! platform's work queue, delay tiers and dead-letter queue. All idempotent; each on a
//! channel of its own, since a refused declaration closes its channel.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use provisioner_events::{PlatformName, REQUESTS_EXCHANGE, STATUS_EXCHANGE};
use tracing::warn;

use super::{
    AmqpConfig, DEAD_LETTER_EXCHANGE, RETRY_TIERS_S, STATUS_JOURNAL_QUEUE, UNROUTED_EXCHANGE,
    UNROUTED_QUEUE, dead_letter_queue, long_string, retry_queue, short, unavailable, work_queue,
};
use crate::broker::BrokerError;

pub(super) async fn declare_exchanges(
    channel: &Channel,
    config: &AmqpConfig,
) -> Result<(), BrokerError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut requests_args = FieldTable::default();
    requests_args.insert("alternate-exchange".into(), long_string(UNROUTED_EXCHANGE));
    channel
        .exchange_declare(
            UNROUTED_EXCHANGE.into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    channel
        .queue_declare(
            UNROUTED_QUEUE.into(),
            QueueDeclareOptions::durable(),
            quorum_args(None, None),
        )
        .await
        .map_err(unavailable)?;
    channel
        .queue_bind(
            UNROUTED_QUEUE.into(),
            UNROUTED_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    channel
        .exchange_declare(
            REQUESTS_EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            requests_args,
        )
        .await
        .map_err(unavailable)?;
    channel
        .exchange_declare(
            STATUS_EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    let mut journal_args = FieldTable::default();
    journal_args
        .insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(config.journal_max_length),
        )
        .insert("x-overflow".into(), long_string("drop-head"));
    channel
        .queue_declare(
            STATUS_JOURNAL_QUEUE.into(),
            QueueDeclareOptions::durable(),
            journal_args,
        )
        .await
        .map_err(unavailable)?;
    channel
        .queue_bind(
            STATUS_JOURNAL_QUEUE.into(),
            STATUS_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    Ok(())
}

fn quorum_args(delivery_limit: Option<i32>, dead_letter_exchange: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    if let Some(limit) = delivery_limit {
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
    }
    if let Some(exchange) = dead_letter_exchange {
        args.insert("x-dead-letter-exchange".into(), long_string(exchange));
        at_least_once(&mut args);
    }
    args
}

/// Dead-letters at least once: the message leaves the queue only when the target queue
/// confirmed it. RabbitMQ honours it only with `reject-publish` overflow.
fn at_least_once(args: &mut FieldTable) {
    args.insert(
        "x-dead-letter-strategy".into(),
        long_string("at-least-once"),
    )
    .insert("x-overflow".into(), long_string("reject-publish"));
}

/// Declares the work queue; one declared by an older version with other arguments is
/// used as it is, with a warning saying what it lacks.
async fn declare_work_queue(
    connection: &Connection,
    config: &AmqpConfig,
    work: &str,
) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await.map_err(unavailable)?;
    let declared = channel
        .queue_declare(
            short(work)?,
            QueueDeclareOptions::durable(),
            quorum_args(Some(config.delivery_limit), Some(DEAD_LETTER_EXCHANGE)),
        )
        .await;
    match declared {
        Ok(_) => Ok(channel),
        Err(e) if e.is_amqp_soft_error() => {
            // The refusal closed that channel; the queue exists with other arguments.
            let channel = connection.create_channel().await.map_err(unavailable)?;
            channel
                .queue_declare(
                    short(work)?,
                    QueueDeclareOptions::default().passive(),
                    FieldTable::default(),
                )
                .await
                .map_err(|_| BrokerError::Refused(e.to_string()))?;
            warn!(
                queue = %work,
                error = %e,
                "the work queue was declared with other arguments (an older version?); using it as it is. It may lack at-least-once dead-lettering: set a policy with dead-letter-strategy=at-least-once and overflow=reject-publish, or recreate it when it is empty"
            );
            Ok(channel)
        }
        Err(e) => Err(unavailable(e)),
    }
}

pub(super) async fn declare_platform(
    connection: &Connection,
    config: &AmqpConfig,
    platform: PlatformName,
) -> Result<(), BrokerError> {
    let work = work_queue(platform);
    let dead = dead_letter_queue(platform);
    let channel = declare_work_queue(connection, config, &work).await?;
    let channel = &channel;
    let bind = |queue: String, exchange: &'static str, key: String| async move {
        channel
            .queue_bind(
                short(&queue)?,
                exchange.into(),
                short(&key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)
    };
    bind(work.clone(), REQUESTS_EXCHANGE, format!("{platform}.*")).await?;
    channel
        .queue_declare(
            short(&dead)?,
            QueueDeclareOptions::durable(),
            quorum_args(None, None),
        )
        .await
        .map_err(unavailable)?;
    bind(dead.clone(), DEAD_LETTER_EXCHANGE, format!("{platform}.#")).await?;
    // Messages that came back from a retry queue carry the work queue's name as their key.
    bind(dead, DEAD_LETTER_EXCHANGE, work.clone()).await?;
    for tier in RETRY_TIERS_S {
        let mut args = quorum_args(None, None);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt((tier * 1000) as i64),
        )
        .insert("x-dead-letter-exchange".into(), long_string(""))
        .insert("x-dead-letter-routing-key".into(), long_string(&work));
        at_least_once(&mut args);
        channel
            .queue_declare(
                short(&retry_queue(platform, tier))?,
                QueueDeclareOptions::durable(),
                args,
            )
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}
