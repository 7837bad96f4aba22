//! Reading the status journal: the bounded queue on `provisioning.status` that keeps the
//! latest events (10,000 by default), so a reader that was away — a watcher across a
//! broker restart, a test judging a run — can still see what was published meanwhile.

use lapin::options::BasicGetOptions;
use provisioner_events::StatusEvent;

use super::{AmqpBroker, BrokerError, STATUS_JOURNAL_QUEUE, believed, unavailable};

impl AmqpBroker {
    /// Takes up to `limit` events off the journal, oldest first. They are gone from it
    /// afterwards: the journal has one reader at a time. Probes, anything that is not
    /// a status event and events whose publisher is not believed are skipped.
    pub async fn take_journal(&self, limit: usize) -> Result<Vec<StatusEvent>, BrokerError> {
        let (connection, _) = self.connection().await?;
        let channel = connection.create_channel().await.map_err(unavailable)?;
        let trust = self.status_trust();
        let mut events = Vec::new();
        let mut read = 0;
        while read < limit {
            let Some(message) = channel
                .basic_get(
                    STATUS_JOURNAL_QUEUE.into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .map_err(unavailable)?
            else {
                break;
            };
            read += 1;
            if let Some(event) = believed(&trust, &message.delivery) {
                events.push(event);
            }
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok(events)
    }
}
