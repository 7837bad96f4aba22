//! Status subscriptions: an exclusive queue bound to every status event, proven to
//! receive (a probe published and heard) before it is handed out.

use futures_util::stream::{BoxStream, StreamExt};
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use provisioner_events::{STATUS_EXCHANGE, StatusEvent};

use super::{AmqpBroker, PROBE_PREFIX, PROBE_ROUTING_KEY, PROBE_TIMEOUT, believed, unavailable};
use crate::broker::BrokerError;

impl AmqpBroker {
    /// Every status event published from now on, on a queue of the subscriber's own,
    /// proven to receive before it is handed out.
    pub(super) async fn subscribe(&self) -> Result<BoxStream<'static, StatusEvent>, BrokerError> {
        let result = async {
            let (connection, _) = self.connection().await?;
            let channel = connection.create_channel().await.map_err(unavailable)?;
            let queue = channel
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            channel
                .queue_bind(
                    queue.name().clone(),
                    STATUS_EXCHANGE.into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            let mut consumer = channel
                .basic_consume(
                    queue.name().clone(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            // Prove the subscription hears the exchange before relying on it: a binding
            // made while the broker is still recovering a vhost can be listed yet route
            // nothing, and a watcher or `submit --wait` would then wait for ever.
            let probe_id = format!("{PROBE_PREFIX}{}", uuid::Uuid::new_v4().simple());
            self.send_once(
                STATUS_EXCHANGE,
                PROBE_ROUTING_KEY,
                b"{}",
                BasicProperties::default().with_message_id(probe_id.as_str().into()),
            )
            .await?
            .await?;
            let mut early = Vec::new();
            let heard = tokio::time::timeout(PROBE_TIMEOUT, async {
                while let Some(item) = consumer.next().await {
                    let delivery = item.map_err(unavailable)?;
                    let id = delivery.properties.message_id().as_ref().map(|id| id.as_str().to_owned());
                    if id.as_deref() == Some(probe_id.as_str()) {
                        return Ok(());
                    }
                    early.push(delivery);
                }
                Err(BrokerError::Unavailable("the subscription ended at once".into()))
            })
            .await;
            match heard {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(BrokerError::Unavailable(format!(
                        "the status subscription did not receive its probe within {} s (is the broker still starting?)",
                        PROBE_TIMEOUT.as_secs()
                    )));
                }
            }
            let trust = self.status_trust();
            let decode = move |delivery: lapin::message::Delivery| believed(&trust, &delivery);
            let early: Vec<StatusEvent> = early.into_iter().filter_map(decode.clone()).collect();
            let events = futures_util::stream::iter(early).chain(
                consumer
                    .take_while(|item| std::future::ready(item.is_ok()))
                    .filter_map(move |item| {
                        let _keep_open = &channel;
                        // Probes (ours and other subscribers') are not status events, nor
                        // is anything whose publisher is not believed.
                        std::future::ready(item.ok().and_then(&decode))
                    }),
            );
            Ok(events.boxed())
        }
        .await;
        self.forget_if_unavailable(result).await
    }
}
