//! The platform worker of the simulated cloud: a [`Platform`] written the way the real
//! cloud workers are (the EC2 worker is its model). It finds what a request made by the
//! request's ownership tag before making anything, launches with a client token derived
//! from the request id (a new one only after the token's instance died), waits for the
//! instance to run under the runtime's health wait, and removes by tag. Every cloud call
//! passes its process's boundaries, so a crash can strike before a call or after the
//! cloud acted and before the worker heard.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use provisioner_core::store::{QuotaCost, vcpus_cost};
use provisioner_core::{CallPacer, Described, Owned, Platform, PlatformError, RateLimit};
use provisioner_events::{
    ErrorClass, Operation, PlatformName, Request, RequestId, Resource, State, TeardownTarget,
};

use crate::cloud::{Cloud, CloudError, Phase, Seen};
use crate::process::Process;

/// The platform the simulated workers serve.
pub const PLATFORM: PlatformName = PlatformName::Process;

/// The largest instance a spec may ask for.
const MAX_CPUS: u64 = 8;

/// How long a provision waits for its instance to run.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The buckets the platform declares, as the cloud enforces them: (capacity, refill/s).
pub fn declared_buckets(run: (f64, f64), mutate: (f64, f64)) -> Vec<(&'static str, (f64, f64))> {
    vec![("RunInstances", run), ("Mutate", mutate)]
}

pub struct SimPlatform {
    process: Arc<Process>,
    cloud: Arc<Cloud>,
    run_bucket: (f64, f64),
    mutate_bucket: (f64, f64),
    pacer: Mutex<Option<Arc<dyn CallPacer>>>,
}

impl std::fmt::Debug for SimPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimPlatform")
            .field("process", &self.process.name)
            .finish_non_exhaustive()
    }
}

fn classify(error: CloudError) -> PlatformError {
    match error {
        CloudError::Throttled(after) => PlatformError {
            retry_after: Some(after),
            ..PlatformError::retryable(ErrorClass::Throttled, "RequestLimitExceeded")
        },
        CloudError::Unavailable(why) => PlatformError::transient(why),
        CloudError::Capacity => PlatformError::retryable(
            ErrorClass::Capacity,
            "InsufficientInstanceCapacity: no capacity for the instance now",
        ),
        CloudError::Quota => PlatformError::permanent(
            ErrorClass::Quota,
            "InstanceLimitExceeded: the account's instance quota is used up",
        ),
        CloudError::NotFound => {
            PlatformError::permanent(ErrorClass::NotFound, "InvalidInstanceID.NotFound")
        }
        CloudError::IncorrectState(phase) => {
            PlatformError::transient(format!("IncorrectInstanceState: the instance is {phase:?}"))
        }
    }
}

/// The spec's vCPUs.
fn cpus_of(request: &Request) -> Result<u64, PlatformError> {
    let spec = request
        .spec
        .as_ref()
        .ok_or_else(|| PlatformError::invalid("a provision needs a spec"))?;
    if let Some(unknown) = spec.keys().find(|k| k.as_str() != "cpus") {
        return Err(PlatformError::invalid(format!(
            "unknown spec field {unknown:?}; the simulated cloud takes \"cpus\""
        )));
    }
    match spec.get("cpus") {
        None => Ok(1),
        Some(value) => value
            .as_u64()
            .filter(|n| (1..=MAX_CPUS).contains(n))
            .ok_or_else(|| {
                PlatformError::invalid(format!("cpus must be a whole number from 1 to {MAX_CPUS}"))
            }),
    }
}

fn resource_of(seen: &Seen) -> Resource {
    Resource {
        id: seen.id.clone(),
        name: seen.owner.clone(),
        address: Some(format!("10.0.0.{}", seen.id.len())),
        ..Resource::default()
    }
}

impl SimPlatform {
    pub fn new(
        process: Arc<Process>,
        cloud: Arc<Cloud>,
        run_bucket: (f64, f64),
        mutate_bucket: (f64, f64),
    ) -> Self {
        SimPlatform {
            process,
            cloud,
            run_bucket,
            mutate_bucket,
            pacer: Mutex::new(None),
        }
    }

    /// One cloud call between its process's boundaries.
    async fn call<T>(
        &self,
        what: &'static str,
        call: impl std::future::Future<Output = Result<T, CloudError>>,
    ) -> Result<T, PlatformError> {
        self.process.boundary(what).await;
        let result = call.await;
        if let Err(e) = &result {
            self.cloud
                .history()
                .note(&self.process.name, || format!("cloud {what} -> {e:?}"));
        }
        self.process.boundary(what).await;
        result.map_err(classify)
    }

    /// Paces a call beyond the one the runtime paced for the request.
    async fn pace(&self, bucket: &str) {
        let pacer = self.pacer.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(pacer) = pacer {
            let (capacity, refill) = if bucket == "RunInstances" {
                self.run_bucket
            } else {
                self.mutate_bucket
            };
            pacer
                .pace(vec![RateLimit::new(bucket, "sim", capacity, refill)])
                .await;
        }
    }

    /// The live instances tagged with `owner`, as the (eventually consistent) listing
    /// shows them.
    async fn live_of(&self, owner: &str) -> Result<Vec<Seen>, PlatformError> {
        let seen = self.call("list", self.cloud.list(Some(owner))).await?;
        Ok(seen
            .into_iter()
            .filter(|s| s.phase != Phase::Terminated)
            .collect())
    }

    /// The instance a target names, if it is live.
    async fn resolve(&self, target: &TeardownTarget) -> Result<Option<Seen>, PlatformError> {
        match target {
            TeardownTarget::Request(id) => Ok(self.live_of(id.as_str()).await?.into_iter().next()),
            TeardownTarget::Resource(id) => {
                let seen = self.call("describe", self.cloud.describe(id)).await?;
                Ok(seen.filter(|s| s.phase != Phase::Terminated))
            }
        }
    }

    /// Waits for `id` to run.
    async fn until_running(&self, id: &str) -> Result<Seen, PlatformError> {
        let wait = async {
            let give_up = tokio::time::Instant::now() + BOOT_TIMEOUT;
            loop {
                match self.call("describe", self.cloud.describe(id)).await? {
                    Some(seen) if seen.phase == Phase::Running => return Ok(seen),
                    Some(seen) if seen.phase == Phase::Terminated => {
                        return Err(PlatformError::retryable(
                            ErrorClass::Capacity,
                            format!("{id} was terminated while it started"),
                        ));
                    }
                    _ => {}
                }
                if tokio::time::Instant::now() >= give_up {
                    return Err(PlatformError::retryable(
                        ErrorClass::Timeout,
                        format!("{id} did not run within {} s", BOOT_TIMEOUT.as_secs()),
                    ));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        provisioner_core::metrics::health_wait(wait).await
    }
}

#[async_trait]
impl Platform for SimPlatform {
    fn name(&self) -> PlatformName {
        PLATFORM
    }

    fn validate(&self, request: &Request) -> Result<(), PlatformError> {
        if request.operation == Operation::Provision {
            cpus_of(request)?;
        }
        Ok(())
    }

    fn rate_limits(&self, request: &Request) -> Vec<RateLimit> {
        if request.dry_run {
            return Vec::new();
        }
        let (bucket, (capacity, refill)) = match request.operation {
            Operation::Provision => ("RunInstances", self.run_bucket),
            Operation::Describe => return Vec::new(),
            _ => ("Mutate", self.mutate_bucket),
        };
        vec![RateLimit::new(bucket, "sim", capacity, refill)]
    }

    async fn quota_cost(&self, request: &Request) -> Result<QuotaCost, PlatformError> {
        Ok(vcpus_cost(cpus_of(request)? * 1000))
    }

    fn settle_time(&self) -> Duration {
        let behaviour = self.cloud.behaviour();
        Duration::from_millis(behaviour.late_landing_ms + behaviour.list_lag_ms)
    }

    fn use_pacer(&self, pacer: Arc<dyn CallPacer>) {
        *self.pacer.lock().unwrap_or_else(|e| e.into_inner()) = Some(pacer);
    }

    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        let owner = request.request_id.as_str();
        let cpus = cpus_of(request)? as u32;
        let id = match self.live_of(owner).await?.into_iter().next() {
            Some(found) => found.id,
            None => {
                let mut token = owner.to_owned();
                let mut launched = None;
                for launch in 0..4 {
                    if launch > 0 {
                        self.pace("RunInstances").await;
                    }
                    let (id, phase) = self
                        .call(
                            "launch",
                            self.cloud
                                .run_instance(&token, owner, request.tenant.clone(), cpus),
                        )
                        .await?;
                    if phase != Phase::Terminated {
                        launched = Some(id);
                        break;
                    }
                    // The token's instance died: a new launch needs a token of its own.
                    token = format!("{owner}/after/{id}");
                }
                launched.ok_or_else(|| {
                    PlatformError::retryable(
                        ErrorClass::Capacity,
                        "every instance launched for the request was terminated",
                    )
                })?
            }
        };
        let running = self.until_running(&id).await?;
        Ok(resource_of(&running))
    }

    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        let live = match target {
            TeardownTarget::Request(id) => self.live_of(id.as_str()).await?,
            TeardownTarget::Resource(_) => self.resolve(target).await?.into_iter().collect(),
        };
        let mut removed = None;
        for (index, instance) in live.iter().enumerate() {
            if index > 0 {
                self.pace("Mutate").await;
            }
            match self
                .call("terminate", self.cloud.terminate(&instance.id))
                .await
            {
                Ok(_) => {}
                Err(e) if e.class == ErrorClass::NotFound => continue,
                Err(e) => return Err(e),
            }
            removed.get_or_insert_with(|| resource_of(instance));
        }
        Ok(removed)
    }

    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        Ok(self.resolve(target).await?.map(|seen| Described {
            state: match seen.phase {
                Phase::Pending => State::Starting,
                Phase::Running => State::Running,
                Phase::Stopped | Phase::Terminated => State::Stopped,
            },
            resource: resource_of(&seen),
        }))
    }

    async fn owner_of(&self, resource_id: &str) -> Result<Option<RequestId>, PlatformError> {
        let seen = self
            .call("describe", self.cloud.describe(resource_id))
            .await?;
        Ok(seen.and_then(|s| RequestId::new(s.owner).ok()))
    }

    async fn owned(&self) -> Result<Vec<Owned>, PlatformError> {
        let seen = self.call("list", self.cloud.list(None)).await?;
        Ok(seen
            .into_iter()
            .filter(|s| s.phase != Phase::Terminated)
            .filter_map(|s| {
                Some(Owned {
                    resource: resource_of(&s),
                    request_id: RequestId::new(s.owner.clone()).ok()?,
                    created: Some(s.landed_wall),
                })
            })
            .collect())
    }

    async fn start(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        let seen = self.resolve(target).await?.ok_or_else(|| {
            PlatformError::permanent(ErrorClass::NotFound, format!("{target} has no instance"))
        })?;
        self.call("start", self.cloud.start(&seen.id)).await?;
        Ok(resource_of(&self.until_running(&seen.id).await?))
    }

    async fn stop(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        let seen = self.resolve(target).await?.ok_or_else(|| {
            PlatformError::permanent(ErrorClass::NotFound, format!("{target} has no instance"))
        })?;
        self.call("stop", self.cloud.stop(&seen.id)).await?;
        Ok(resource_of(&seen))
    }

    async fn reboot(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        let seen = self.resolve(target).await?.ok_or_else(|| {
            PlatformError::permanent(ErrorClass::NotFound, format!("{target} has no instance"))
        })?;
        self.call("reboot", self.cloud.reboot(&seen.id)).await?;
        Ok(resource_of(&seen))
    }

    async fn check(&self, request: &Request) -> Result<(), PlatformError> {
        self.validate(request)
    }
}
