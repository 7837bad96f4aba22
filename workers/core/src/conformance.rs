//! The conformance suite every platform must pass: each operation run twice must give
//! the same result (idempotency), and tearing down what is gone must succeed.
//!
//! A platform crate calls [`check_platform`] from its own tests with a valid provision
//! request and a probe that says whether the resource really exists.

use std::future::Future;

use provisioner_events::{Request, Resource, TeardownTarget};

use crate::platform::Platform;

/// Runs the suite; panics with a message naming the broken rule.
pub async fn check_platform<P, F, Fut>(platform: &P, provision: &Request, exists: F)
where
    P: Platform + ?Sized,
    F: Fn(Resource) -> Fut,
    Fut: Future<Output = bool>,
{
    let name = platform.name();
    platform
        .validate(provision)
        .unwrap_or_else(|e| panic!("{name}: the sample request must be valid: {e}"));
    let first = platform
        .provision(provision)
        .await
        .unwrap_or_else(|e| panic!("{name}: provision failed: {e}"));
    assert!(
        exists(first.clone()).await,
        "{name}: provisioned resource does not exist"
    );
    let second = platform
        .provision(provision)
        .await
        .unwrap_or_else(|e| panic!("{name}: provision run twice failed: {e}"));
    assert_eq!(
        first.id, second.id,
        "{name}: provision run twice made a second resource"
    );
    assert_eq!(
        first.name, second.name,
        "{name}: provision run twice renamed the resource"
    );

    // A request naming the resource by id must serialize with (and, for a teardown,
    // tombstone) the request that made it: the platform must be able to tell which.
    match platform.owner_of(&first.id).await {
        Ok(Some(owner)) => assert_eq!(
            owner, provision.request_id,
            "{name}: owner_of names another request"
        ),
        Ok(None) => panic!("{name}: owner_of cannot tell who made {}", first.id),
        Err(e) => panic!("{name}: owner_of failed: {e}"),
    }
    let target = TeardownTarget::Request(provision.request_id.clone());
    match platform.describe(&target).await {
        Ok(Some(described)) => {
            assert_eq!(
                described.resource.id, first.id,
                "{name}: describe found another resource"
            );
            assert_eq!(
                described.state,
                provisioner_events::State::Running,
                "{name}: describe of a provisioned resource"
            );
        }
        Ok(None) => panic!("{name}: describe does not find the provisioned resource"),
        Err(e) if e.class == provisioner_events::ErrorClass::Unsupported => {}
        Err(e) => panic!("{name}: describe failed: {e}"),
    }

    let removed = platform
        .teardown(&target)
        .await
        .unwrap_or_else(|e| panic!("{name}: teardown failed: {e}"));
    if let Some(removed) = removed {
        assert_eq!(
            removed.id, first.id,
            "{name}: teardown removed another resource"
        );
    }
    assert!(
        !exists(first.clone()).await,
        "{name}: resource still exists after teardown"
    );
    let again = platform
        .teardown(&target)
        .await
        .unwrap_or_else(|e| panic!("{name}: teardown of what is gone must succeed: {e}"));
    assert!(
        again.is_none(),
        "{name}: a second teardown claims to have removed something"
    );
    let by_resource = platform
        .teardown(&TeardownTarget::Resource(first.id.clone()))
        .await
        .unwrap_or_else(|e| panic!("{name}: teardown by gone resource id must succeed: {e}"));
    assert!(
        by_resource.is_none(),
        "{name}: teardown by resource id of a gone resource removed something"
    );
}
