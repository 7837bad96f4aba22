//! For the AWS workers' tests: the moto that enforces IAM (`localstack/start-moto.sh`
//! starts it on 127.0.0.1:5001 and keeps its administrator's key), and IAM users made
//! there holding exactly one policy, so a worker tested as such a user is refused every
//! action its documented policy does not grant, as AWS would refuse it.
//!
//! moto checks each call's action against the caller's policies, `Allow` and `Deny`,
//! with `Resource` matched as `*`; it does not evaluate what AWS checks beyond the
//! action (tag-on-create's `ec2:CreateTags`, `iam:PassRole` on a task's role), and an
//! `Allow` whose condition does not hold counts there as a denial.

use aws_credential_types::Credentials;

/// The endpoint of the moto that enforces IAM (`PROVISIONER_TEST_IAM_ENDPOINT`).
pub fn endpoint() -> String {
    std::env::var("PROVISIONER_TEST_IAM_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:5001".into())
}

/// The key of that moto's administrator, who may do anything: for a test's own setup
/// (clusters, task definitions, users), never for the worker under test.
pub fn admin() -> Credentials {
    let path = std::env::var("PROVISIONER_TEST_IAM_ADMIN").unwrap_or_else(|_| {
        let dir = std::env::var("SERVICES_LOG_DIR")
            .unwrap_or_else(|_| "/tmp/provisioner-services".into());
        let port = endpoint()
            .rsplit(':')
            .next()
            .unwrap_or("5001")
            .trim_end_matches('/')
            .to_owned();
        format!("{dir}/moto-iam-{port}-admin.json")
    });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{path}: {e} (the README's test command starts the moto that enforces IAM and writes it)")
    });
    let key: serde_json::Value = serde_json::from_str(&text).expect("the admin key file is JSON");
    Credentials::new(
        key["access_key_id"].as_str().expect("access_key_id"),
        key["secret_access_key"]
            .as_str()
            .expect("secret_access_key"),
        None,
        None,
        "moto-iam-admin",
    )
}

/// A new IAM user (named `<name>-<random>`) holding exactly `policy` as its one inline
/// policy, and its key.
pub async fn user_with_policy(name: &str, policy: &serde_json::Value) -> Credentials {
    let iam = aws_sdk_iam::Client::from_conf(
        aws_sdk_iam::Config::builder()
            .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
            .endpoint_url(endpoint())
            .region(aws_sdk_iam::config::Region::new("us-east-1"))
            .credentials_provider(admin())
            .build(),
    );
    let user = format!(
        "{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    iam.create_user()
        .user_name(&user)
        .send()
        .await
        .unwrap_or_else(|e| panic!("creating IAM user {user} on {}: {e:?}", endpoint()));
    iam.put_user_policy()
        .user_name(&user)
        .policy_name("documented")
        .policy_document(policy.to_string())
        .send()
        .await
        .expect("put the user's policy");
    let key = iam
        .create_access_key()
        .user_name(&user)
        .send()
        .await
        .expect("an access key")
        .access_key
        .expect("the key");
    Credentials::new(
        key.access_key_id,
        key.secret_access_key,
        None,
        None,
        "moto-iam-user",
    )
}

/// `policy` without `action` in any `Allow` statement: for proving the double refuses
/// what the policy does not grant.
pub fn without(policy: &serde_json::Value, action: &str) -> serde_json::Value {
    let mut policy = policy.clone();
    if let Some(statements) = policy["Statement"].as_array_mut() {
        for statement in statements.iter_mut() {
            match &mut statement["Action"] {
                serde_json::Value::Array(actions) => actions.retain(|a| a != action),
                single if single == action => *single = serde_json::json!([]),
                _ => {}
            }
        }
        statements.retain(|s| s["Action"] != serde_json::json!([]));
    }
    policy
}
