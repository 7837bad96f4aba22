//! The connection and its publishing channel: made lazily, checked before each use, and
//! made again after the broker drops it.

use std::sync::Arc;

use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;
use tracing::debug;

use super::topology::declare_shared;
use super::{AmqpBroker, AmqpConfig, Inner, Session, login_user, short, unavailable};
use crate::broker::BrokerError;

impl AmqpBroker {
    /// Makes no connection yet; the first operation connects.
    pub fn new(config: AmqpConfig) -> Self {
        AmqpBroker {
            inner: Arc::new(Inner {
                login_user: login_user(&config.url),
                config,
                session: Mutex::new(None),
            }),
        }
    }

    /// Connects now, so a bad URL or a broker that is down shows at start.
    pub async fn connect(config: AmqpConfig) -> Result<Self, BrokerError> {
        let broker = Self::new(config);
        broker.publisher().await?;
        Ok(broker)
    }

    pub(super) async fn connection(&self) -> Result<(Arc<Connection>, Channel), BrokerError> {
        let connected = self.connect_session().await;
        self.forget_if_unavailable(connected).await
    }

    /// After the broker drops a connection, lapin may report it connected for a moment:
    /// whatever fails as unavailable makes the next call connect afresh. Except a
    /// connection the broker blocks (a memory or disk alarm): it is alive, and kept, so
    /// that [`Broker::blocked`](crate::Broker::blocked) goes on saying so and the worker
    /// takes no work until the alarm clears (a fresh connection would not be blocked until
    /// it published, and the worker would take work it cannot report, one failed publish
    /// after another).
    pub(super) async fn forget_if_unavailable<T>(
        &self,
        result: Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        if matches!(result, Err(BrokerError::Unavailable(_))) {
            let mut session = self.inner.session.lock().await;
            let blocked = session.as_ref().is_some_and(|s| {
                s.connection.status().connected() && s.connection.status().blocked()
            });
            if !blocked {
                *session = None;
            }
        }
        result
    }

    async fn connect_session(&self) -> Result<(Arc<Connection>, Channel), BrokerError> {
        let mut session = self.inner.session.lock().await;
        if let Some(current) = session.as_ref() {
            if current.connection.status().connected() && current.publisher.status().connected() {
                return Ok((current.connection.clone(), current.publisher.clone()));
            }
            debug!("AMQP connection lost; reconnecting");
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(self.inner.config.connection_name.clone().into());
        // A broker that is still booting can accept the TCP connection and never finish
        // the handshake; without a bound, a reconnecting worker would wait forever.
        let setup = async {
            let connection = Arc::new(
                Connection::connect(&self.inner.config.url, properties)
                    .await
                    .map_err(unavailable)?,
            );
            let publisher = connection.create_channel().await.map_err(unavailable)?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(unavailable)?;
            declare_shared(&connection, &self.inner.config).await?;
            Ok::<_, BrokerError>((connection, publisher))
        };
        let (connection, publisher) =
            tokio::time::timeout(self.inner.config.connect_timeout, setup)
                .await
                .map_err(|_| {
                    BrokerError::Unavailable(format!(
                        "no answer from the broker within {} s of connecting",
                        self.inner.config.connect_timeout.as_secs()
                    ))
                })??;
        *session = Some(Session {
            connection: connection.clone(),
            publisher: publisher.clone(),
        });
        Ok((connection, publisher))
    }

    async fn publisher(&self) -> Result<Channel, BrokerError> {
        Ok(self.connection().await?.1)
    }

    /// Messages waiting in a queue, for tests and operators. Declares nothing.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BrokerError> {
        let (connection, _) = self.connection().await?;
        // A passive declare of a missing queue closes its channel: use a throwaway one.
        let probe = connection.create_channel().await.map_err(unavailable)?;
        let declared = probe
            .queue_declare(
                short(queue)?,
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let _ = probe.close(200, "OK".into()).await;
        Ok(declared.message_count())
    }
}
