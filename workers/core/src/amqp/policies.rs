//! Puts the topology's policies in place through RabbitMQ's management HTTP API
//! (`/api/policies`), since AMQP itself cannot set a policy.
//!
//! A policy that exists is never changed: it is the operator's (loaded with the
//! definitions, or tuned since), and the point of a policy is that an operator's change
//! stays. Only a missing one is created, with the code's defaults. When the API is out of
//! reach (a broker without the management plugin, a user without the `policymaker` tag,
//! an `amqps://` broker whose API address is not configured) the caller falls back to
//! queue arguments; nothing here is fatal.

use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;
use tracing::{debug, info};

use super::AmqpConfig;
use super::topology::Policy;

/// Where the management API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagementApi {
    /// `http://<broker host>:15672` with the broker URL's credentials, for `amqp://`
    /// URLs (the plugin's default listener); none for `amqps://`, whose API address
    /// differs between providers.
    Derived,
    /// This base URL (`https://host:443`); credentials in it, or else the broker URL's.
    At(String),
    /// Never use it: policies come from the operator (the definitions).
    Off,
}

impl ManagementApi {
    /// From `RABBITMQ_MANAGEMENT_URL`: unset means derived, `off` means off.
    pub fn from_setting(setting: Option<&str>) -> ManagementApi {
        match setting.map(str::trim) {
            None | Some("") => ManagementApi::Derived,
            Some(off) if off.eq_ignore_ascii_case("off") => ManagementApi::Off,
            Some(url) => ManagementApi::At(url.trim_end_matches('/').to_owned()),
        }
    }
}

/// Whether the policies are in place, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Policies {
    InPlace,
    OutOfReach(String),
}

/// The whole exchange with the API is bounded: it runs inside the connect timeout.
const API_TIMEOUT: Duration = Duration::from_secs(3);

struct Endpoint {
    base: String,
    username: String,
    password: String,
    vhost: String,
}

fn endpoint(config: &AmqpConfig) -> Result<Endpoint, String> {
    let uri: AMQPUri = config
        .url
        .parse()
        .map_err(|e| format!("the broker URL does not parse: {e}"))?;
    let credentials = (
        uri.authority.userinfo.username.clone(),
        uri.authority.userinfo.password.clone(),
    );
    let (base, (username, password)) = match &config.management_api {
        ManagementApi::Off => return Err("RABBITMQ_MANAGEMENT_URL is off".into()),
        ManagementApi::Derived => match uri.scheme {
            AMQPScheme::AMQP => (
                format!("http://{}:15672", host_for_url(&uri.authority.host)),
                credentials,
            ),
            AMQPScheme::AMQPS => {
                return Err(
                    "an amqps:// broker's management API address is not derived: set RABBITMQ_MANAGEMENT_URL".into(),
                );
            }
        },
        ManagementApi::At(url) => {
            let parsed =
                reqwest::Url::parse(url).map_err(|e| format!("RABBITMQ_MANAGEMENT_URL: {e}"))?;
            if parsed.username().is_empty() {
                (url.clone(), credentials)
            } else {
                let decode = |text: &str| {
                    percent_encoding::percent_decode_str(text)
                        .decode_utf8_lossy()
                        .into_owned()
                };
                let mut bare = parsed.clone();
                let _ = bare.set_username("");
                let _ = bare.set_password(None);
                (
                    bare.as_str().trim_end_matches('/').to_owned(),
                    (
                        decode(parsed.username()),
                        decode(parsed.password().unwrap_or_default()),
                    ),
                )
            }
        }
    };
    Ok(Endpoint {
        base,
        username,
        password,
        vhost: uri.vhost,
    })
}

/// An IPv6 literal goes in brackets in a URL.
fn host_for_url(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Creates each of `policies` that does not exist on the broker URL's vhost.
pub(super) async fn ensure(config: &AmqpConfig, policies: &[Policy]) -> Policies {
    if policies.is_empty() {
        return Policies::InPlace;
    }
    let endpoint = match endpoint(config) {
        Ok(endpoint) => endpoint,
        Err(why) => return Policies::OutOfReach(why),
    };
    match tokio::time::timeout(API_TIMEOUT, ensure_at(&endpoint, policies)).await {
        Ok(Ok(())) => Policies::InPlace,
        Ok(Err(why)) => Policies::OutOfReach(format!("{}: {why}", endpoint.base)),
        Err(_) => Policies::OutOfReach(format!(
            "{}: no answer within {} s",
            endpoint.base,
            API_TIMEOUT.as_secs()
        )),
    }
}

async fn ensure_at(endpoint: &Endpoint, policies: &[Policy]) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .connect_timeout(API_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let vhost = utf8_percent_encode(&endpoint.vhost, NON_ALPHANUMERIC).to_string();
    for policy in policies {
        let url = format!(
            "{}/api/policies/{vhost}/{}",
            endpoint.base,
            utf8_percent_encode(&policy.name, NON_ALPHANUMERIC)
        );
        let found = client
            .get(&url)
            .basic_auth(&endpoint.username, Some(&endpoint.password))
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        match found.status() {
            StatusCode::OK => {
                debug!(policy = %policy.name, "the policy exists; left as it is");
                continue;
            }
            StatusCode::NOT_FOUND => {}
            status => return Err(refusal(status, found).await),
        }
        let mut body = policy.definition_json(&endpoint.vhost);
        if let Some(fields) = body.as_object_mut() {
            // The API takes the vhost and name from the path.
            fields.remove("vhost");
            fields.remove("name");
        }
        let created = client
            .put(&url)
            .basic_auth(&endpoint.username, Some(&endpoint.password))
            .json(&body)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if !created.status().is_success() {
            return Err(refusal(created.status(), created).await);
        }
        info!(policy = %policy.name, pattern = %policy.pattern, "created the missing policy with the default settings");
    }
    Ok(())
}

async fn refusal(status: StatusCode, response: reqwest::Response) -> String {
    let body = response.text().await.unwrap_or_default();
    let reason = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or(body);
    format!("{status} {}", reason.chars().take(200).collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, api: ManagementApi) -> AmqpConfig {
        let mut config = AmqpConfig::new(url);
        config.management_api = api;
        config
    }

    #[test]
    fn the_api_address_comes_from_the_broker_url_unless_it_is_given() {
        let derived = endpoint(&config(
            "amqp://user%40x:p%2Fw@rabbit.local:5672/my%2Fvhost",
            ManagementApi::Derived,
        ))
        .expect("derived");
        assert_eq!(derived.base, "http://rabbit.local:15672");
        assert_eq!(
            (derived.username.as_str(), derived.password.as_str()),
            ("user@x", "p/w")
        );
        assert_eq!(derived.vhost, "my/vhost");

        let default_vhost =
            endpoint(&config("amqp://g:g@h:5672/%2f", ManagementApi::Derived)).expect("derived");
        assert_eq!(default_vhost.vhost, "/");

        let tls = endpoint(&config("amqps://g:g@h:5671/%2f", ManagementApi::Derived));
        assert!(tls.is_err_and(|why| why.contains("RABBITMQ_MANAGEMENT_URL")));

        let given = endpoint(&config(
            "amqps://g:g@h:5671/%2f",
            ManagementApi::from_setting(Some("https://admin:s%40cret@console.example:443/")),
        ))
        .expect("given");
        assert_eq!(given.base, "https://console.example");
        assert_eq!(
            (given.username.as_str(), given.password.as_str()),
            ("admin", "s@cret")
        );

        assert!(
            endpoint(&config(
                "amqp://g:g@h/%2f",
                ManagementApi::from_setting(Some("off"))
            ))
            .is_err()
        );
    }
}
