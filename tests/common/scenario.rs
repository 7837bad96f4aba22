//! The end-to-end contract every platform keeps, written once and run for each of them:
//! a provision published five times makes one resource and five identical `running`
//! answers, and torn down twice, both teardowns answer `stopped` and nothing is left.
//! Each platform's test supplies the spec and how to count what the platform holds for
//! a request (containers, instances, tasks, Deployments…), and adds its own checks of
//! the resource in between.

use provisioner_events::{State, StatusEvent};

use super::{Events, TestEnv, id};

/// One platform's run of the scenario.
pub struct Scenario<'a> {
    /// The platform name requests carry.
    pub platform: &'a str,
    /// The name the worker was started under (for its log in a failure).
    pub worker: &'a str,
    /// A stem for the request ids (the run id is added).
    pub name: &'a str,
    pub spec: serde_json::Value,
}

impl Scenario<'_> {
    /// The provision request, labelled with the test's run id as every test's resources
    /// are (the Docker harness finds its containers by it).
    pub fn request(&self, env: &TestEnv) -> serde_json::Value {
        serde_json::json!({
            "schema_version": 1, "request_id": format!("{}-{}", self.name, env.run_id),
            "operation": "provision", "platform": self.platform, "spec": self.spec,
            "labels": {"test-run": env.run_id}
        })
    }

    /// Publishes the provision five times and checks the answers: five terminal events,
    /// all `running` and identical, and `live` (what the platform holds for the request
    /// id) counts one resource. Returns the `running` event.
    pub async fn provision_five_times(
        &self,
        env: &TestEnv,
        events: &mut Events,
        live: impl AsyncFn(&str) -> usize,
    ) -> StatusEvent {
        let request = self.request(env);
        for _ in 0..5 {
            env.publish(&request).await;
        }
        let terminal = events.terminal_count(&id(&request), 5).await;
        assert_eq!(
            terminal[0].state,
            State::Running,
            "{terminal:#?}\n{}",
            env.worker_log(self.worker)
        );
        assert!(
            terminal.iter().all(|e| *e == terminal[0]),
            "five deliveries, identical answers: {terminal:#?}"
        );
        assert_eq!(
            live(&id(&request)).await,
            1,
            "five deliveries of {} made one resource",
            self.platform
        );
        terminal[0].clone()
    }

    /// Tears the provision down twice: both answer `stopped` (the second finds nothing
    /// and says so as success), and `live` counts nothing left.
    pub async fn tear_down_twice(
        &self,
        env: &TestEnv,
        events: &mut Events,
        live: impl AsyncFn(&str) -> usize,
    ) {
        let target = id(&self.request(env));
        for step in ["down", "down-again"] {
            let down = serde_json::json!({
                "schema_version": 1,
                "request_id": format!("{}-{step}-{}", self.name, env.run_id),
                "operation": "teardown", "platform": self.platform, "target_request_id": target
            });
            env.publish(&down).await;
            let answer = events.terminal(&id(&down)).await;
            assert_eq!(
                answer.state,
                State::Stopped,
                "{step}: {answer:#?}\n{}",
                env.worker_log(self.worker)
            );
        }
        assert_eq!(live(&target).await, 0, "nothing of {target} is left");
    }
}
