//! What the fleet benches share: three in-process workers of one platform on a RabbitMQ
//! vhost and Redis prefix of their own, a request published, and its terminal event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use provisioner_core::amqp::{AmqpBroker, AmqpConfig};
use provisioner_core::redis_store::RedisStore;
use provisioner_core::{Broker, Platform, Worker, WorkerConfig};
use provisioner_events::StatusEvent;

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("timeout")
        .arg("120")
        .arg("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

/// Three workers of `platform` running until [`Fleet::stop`].
pub struct Fleet {
    broker: Arc<AmqpBroker>,
    events: BoxStream<'static, StatusEvent>,
    stop: tokio::sync::watch::Sender<bool>,
    vhost: String,
}

impl Fleet {
    /// Starts three workers of `platform` on a new vhost and key prefix named after `tag`.
    pub async fn start(platform: Arc<dyn Platform>, tag: &str) -> Fleet {
        let vhost = format!("bench-{tag}");
        rabbitmqctl(&["-q", "add_vhost", &vhost]);
        rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            &vhost,
            "guest",
            ".*",
            ".*",
            ".*",
        ]);
        let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
        let redis_url =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let store = Arc::new(
            RedisStore::connect(
                &redis_url,
                &format!("bench-{tag}:"),
                Duration::from_secs(3600),
            )
            .await
            .expect("Redis")
            .for_platform(platform.name()),
        );
        let connect = || async {
            Arc::new(
                AmqpBroker::connect(AmqpConfig::new(url.clone()))
                    .await
                    .expect("RabbitMQ"),
            )
        };
        let broker = connect().await;
        broker.declare(platform.name()).await.expect("topology");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        for n in 0..3 {
            let worker = Arc::new(Worker::new(
                platform.clone(),
                store.clone(),
                connect().await,
                WorkerConfig {
                    worker_id: format!("bench-{n}"),
                    ..WorkerConfig::default()
                },
            ));
            let mut stopped = stopped.clone();
            tokio::spawn(worker.run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            }));
        }
        let events = broker.subscribe_status().await.expect("subscribe");
        // Let the workers start consuming, so the timing is the fleet's, not the start-up's.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Fleet {
            broker,
            events,
            stop,
            vhost,
        }
    }

    /// Publishes `body` (request `id`) and waits for its terminal event: the event and
    /// the time from publish to it.
    pub async fn run(
        &mut self,
        routing_key: &str,
        id: &str,
        body: &str,
    ) -> (StatusEvent, Duration) {
        let started = Instant::now();
        self.broker
            .publish_request(routing_key, id, body.as_bytes())
            .await
            .expect("publish");
        loop {
            let event = tokio::time::timeout(Duration::from_secs(3600), self.events.next())
                .await
                .expect("the request never ended")
                .expect("status stream");
            if event.request_id == id && event.state.is_terminal() {
                return (event, started.elapsed());
            }
        }
    }

    /// Stops the workers and deletes the vhost.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        drop(self.events);
        tokio::time::sleep(Duration::from_millis(500)).await;
        rabbitmqctl(&["-q", "delete_vhost", &self.vhost]);
    }
}
