//! Consuming a platform's work queue, and settling each delivery: ack, requeue, a delay
//! tier or the dead letters, always on the delivery's own channel.

use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::stream::StreamExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use provisioner_events::PlatformName;
use tracing::warn;

use super::publish::Letter;
use super::{
    ATTEMPT_HEADER, AmqpBroker, INTERNAL_EXCHANGE, ROUTING_KEY_HEADER, WAITS_HEADER, header_string,
    header_u32, short, trace_headers, unavailable, work_queue,
};
use crate::broker::{BrokerError, Delivery, DeliveryParts, DeliveryStream, Settle, Settlement};
use crate::signing::SIGNATURE_HEADER;

struct AmqpSettle {
    broker: AmqpBroker,
    acker: lapin::Acker,
    /// Keeps the delivery's channel open until it is settled: closing it would hand the
    /// delivery back to the broker while it is still being worked on.
    _channel: Channel,
    platform: PlatformName,
    message_id: String,
}

impl AmqpSettle {
    async fn nack(&self, requeue: bool) {
        if let Err(e) = self
            .acker
            .nack(BasicNackOptions {
                requeue,
                ..Default::default()
            })
            .await
        {
            warn!(error = %e, "nack failed; the broker redelivers when the channel closes");
        }
    }
}

#[async_trait]
impl Settle for AmqpSettle {
    async fn settle(
        self: Box<Self>,
        delivery: DeliveryParts,
        settlement: Settlement,
    ) -> Result<(), BrokerError> {
        match settlement {
            Settlement::Ack => {}
            Settlement::Requeue => {
                self.nack(true).await;
                return Ok(());
            }
            Settlement::Retry {
                delay,
                attempt,
                waits,
            } => {
                let letter = Letter {
                    attempt,
                    ..Letter::of(&delivery, &self.message_id)
                };
                let published = self
                    .broker
                    .schedule_retry(self.platform, letter, delay, waits)
                    .await;
                if let Err(e) = published {
                    // The park was refused (its delay queue full, an alarm, the channel
                    // gone): the message comes back after its delay all the same, held
                    // here meanwhile, not at once, or a refusing broker would get a hot
                    // loop of redeliveries, each with its store calls. Not counted as a
                    // wait: an outage is not one (README, "Every attempt counts").
                    tokio::time::sleep(delay.min(crate::broker::REFUSED_PARK_HOLD)).await;
                    self.nack(true).await;
                    return Err(e);
                }
            }
            Settlement::DeadLetter { class, reason } => {
                let published = self
                    .broker
                    .dead_letter(Letter::of(&delivery, &self.message_id), class, &reason)
                    .await;
                if let Err(e) = published {
                    // The queue's own dead-lettering keeps it, without our reason.
                    self.nack(false).await;
                    return Err(e);
                }
            }
        }
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(unavailable)
            .map(drop)
    }
}

impl AmqpBroker {
    /// Deliveries of the platform's work queue, each settled on its own channel.
    pub(super) async fn consume_platform(
        &self,
        platform: PlatformName,
        prefetch: u16,
    ) -> Result<DeliveryStream, BrokerError> {
        let result = async {
            let (connection, _) = self.connection().await?;
            let channel = connection.create_channel().await.map_err(unavailable)?;
            channel
                .basic_qos(prefetch.max(1), BasicQosOptions::default())
                .await
                .map_err(unavailable)?;
            let consumer = channel
                .basic_consume(
                    short(&work_queue(platform))?,
                    short(&self.inner.config.connection_name)?,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            let broker = self.clone();
            // The channel lives as long as the stream: the closure owns a handle to it.
            let deliveries = consumer.map(move |item| {
                let delivery = item.map_err(unavailable)?;
                let properties = &delivery.properties;
                let attempt = header_u32(properties, ATTEMPT_HEADER).unwrap_or(1);
                // Workers' own messages come through their own exchange, or back from a
                // delay queue through the default one; producers may write neither.
                let from_producers = !matches!(delivery.exchange.as_str(), "" | INTERNAL_EXCHANGE);
                // A parked copy keeps the routing key its signature covers in a header; a
                // producer's message is checked against the key the broker routed it by,
                // never one it wrote in a header.
                let routing_key = header_string(properties, ROUTING_KEY_HEADER)
                    .filter(|_| !from_producers)
                    .unwrap_or_else(|| delivery.routing_key.as_str().to_owned());
                let message_id = properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
                    .unwrap_or_default();
                let waits = header_u32(properties, WAITS_HEADER).unwrap_or(0);
                let published_at = properties
                    .timestamp()
                    .map(|seconds| UNIX_EPOCH + Duration::from_secs(seconds));
                let settle = AmqpSettle {
                    broker: broker.clone(),
                    acker: delivery.acker.clone(),
                    _channel: channel.clone(),
                    platform,
                    message_id: message_id.clone(),
                };
                Ok(Delivery::new(
                    delivery.data,
                    routing_key,
                    attempt,
                    delivery.redelivered,
                    Box::new(settle),
                )
                .with_waits(waits)
                .with_message_id(Some(message_id))
                .with_publisher(properties.user_id().as_ref().map(|u| u.as_str().to_owned()))
                .with_published_at(published_at)
                .with_trace(trace_headers(properties))
                .with_signature(header_string(properties, SIGNATURE_HEADER), from_producers))
            });
            Ok(deliveries.boxed())
        }
        .await;
        self.forget_if_unavailable(result).await
    }
}
