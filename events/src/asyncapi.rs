//! The AsyncAPI 3.0 document of the wire contract: the two exchanges, their routing keys,
//! their messages (payloads are the JSON Schemas of `events/schema/`) and the headers
//! that travel with them. Generated from the crate's own names and lists, committed as
//! `events/schema/asyncapi.json` and kept equal to the code by `tests/contract.rs`.

use serde_json::{Value, json};

use crate::{Operation, PlatformName, REQUESTS_EXCHANGE, SCHEMA_VERSION, STATUS_EXCHANGE, State};

/// Every operation, for the routing keys' parameter.
const OPERATIONS: [Operation; 6] = [
    Operation::Provision,
    Operation::Teardown,
    Operation::Start,
    Operation::Stop,
    Operation::Reboot,
    Operation::Describe,
];

/// Every state, for the routing keys' parameter.
const STATES: [State; 7] = [
    State::NotStarted,
    State::Starting,
    State::Running,
    State::Stopping,
    State::Stopped,
    State::Error,
    State::Checked,
];

/// Keeps the lists above whole: adding an operation or a state fails to compile here
/// until it is listed.
#[allow(dead_code)]
fn listed(operation: Operation, state: State) {
    match operation {
        Operation::Provision
        | Operation::Teardown
        | Operation::Start
        | Operation::Stop
        | Operation::Reboot
        | Operation::Describe => {}
    }
    match state {
        State::NotStarted
        | State::Starting
        | State::Running
        | State::Stopping
        | State::Stopped
        | State::Error
        | State::Checked => {}
    }
}

/// The W3C trace header, as the workers read and write it.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The request signature header of a deployment that signs requests.
pub const SIGNATURE_HEADER: &str = "x-provisioner-signature";

fn exchange(name: &str) -> Value {
    json!({
        "amqp": {
            "is": "routingKey",
            "exchange": {"name": name, "type": "topic", "durable": true, "autoDelete": false, "vhost": "/"},
            "bindingVersion": "0.3.0"
        }
    })
}

fn payload(file: &str) -> Value {
    json!({
        "schemaFormat": "application/schema+json;version=draft-2020-12",
        "schema": {"$ref": format!("./{file}")}
    })
}

const TRACEPARENT_PATTERN: &str = "^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$";

/// The document.
pub fn document() -> Value {
    let platforms: Vec<&str> = PlatformName::ALL.iter().map(|p| p.as_str()).collect();
    let operations: Vec<&str> = OPERATIONS.iter().map(|o| o.as_str()).collect();
    let states: Vec<&str> = STATES.iter().map(|s| s.as_str()).collect();
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "provisioner",
            "version": SCHEMA_VERSION.to_string(),
            "description": "Provisioning driven by messages: producers publish provision and teardown requests on the requests exchange; the workers of each platform carry them out and report every step on the status exchange. A request's id is its idempotency key: the same request published again never does its work twice. The documents of this directory (request.schema.json, status-event.schema.json, spec-<platform>.schema.json) are the payloads."
        },
        "defaultContentType": "application/json",
        "channels": {
            "requests": {
                "address": "{platform}.{operation}",
                "title": REQUESTS_EXCHANGE,
                "description": format!("The topic exchange `{REQUESTS_EXCHANGE}`. Each platform's work queue `provisioning.<platform>` is bound on `<platform>.*`; a request no queue takes goes to `provisioning.unrouted`."),
                "parameters": {
                    "platform": {"enum": platforms, "description": "the request's `platform`"},
                    "operation": {"enum": operations, "description": "the request's `operation`"}
                },
                "messages": {"request": {"$ref": "#/components/messages/request"}},
                "bindings": exchange(REQUESTS_EXCHANGE)
            },
            "status": {
                "address": "{platform}.{state}",
                "title": STATUS_EXCHANGE,
                "description": format!("The topic exchange `{STATUS_EXCHANGE}`: every step of every request, ordered per request by `seq`. `provisioning.status.journal` keeps the latest 10,000. Messages with the routing key `provisioner.subscription-probe` are a subscriber's own probe, not events: skip them."),
                "parameters": {
                    "platform": {"description": "the request's platform as it gave it (`unknown` when it gave none)"},
                    "state": {"enum": states, "description": "the event's `state`"}
                },
                "messages": {"statusEvent": {"$ref": "#/components/messages/statusEvent"}},
                "bindings": exchange(STATUS_EXCHANGE)
            }
        },
        "operations": {
            "receiveRequest": {
                "action": "receive",
                "channel": {"$ref": "#/channels/requests"},
                "summary": "A worker of the platform takes the request, once, however often it is delivered.",
                "messages": [{"$ref": "#/channels/requests/messages/request"}]
            },
            "sendStatusEvent": {
                "action": "send",
                "channel": {"$ref": "#/channels/status"},
                "summary": "Every step of a request: starting, its terminal state (running, stopped, error, checked) and, for fleets, progress.",
                "messages": [{"$ref": "#/channels/status/messages/statusEvent"}]
            }
        },
        "components": {
            "messages": {
                "request": {
                    "name": "request",
                    "title": "A provisioning request",
                    "contentType": "application/json",
                    "payload": payload("request.schema.json"),
                    "headers": {
                        "type": "object",
                        "properties": {
                            TRACEPARENT_HEADER: {"type": "string", "pattern": TRACEPARENT_PATTERN, "description": "W3C Trace Context: the worker's spans and the request's status events join this trace"},
                            "tracestate": {"type": "string", "description": "W3C Trace Context vendor state, carried along"},
                            SIGNATURE_HEADER: {"type": "string", "pattern": "^key=[A-Za-z0-9._-]{1,64},t=[0-9]+,v1=[0-9a-f]{64}$", "description": "Where the deployment signs requests: HMAC-SHA256 under the key of `v1\\n<key>\\n<t>\\n<routing key>\\n` and the body's bytes. Unsigned, altered, stale or unknown-key requests end in `error` class `permission` and never run"}
                        }
                    },
                    "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": "0.3.0"}},
                    "description": "Set `message_id` to the request id and `timestamp` to the time of publishing: a message older than the deployment's retention is refused rather than run again."
                },
                "statusEvent": {
                    "name": "statusEvent",
                    "title": "A status event",
                    "contentType": "application/json",
                    "payload": payload("status-event.schema.json"),
                    "headers": {
                        "type": "object",
                        "properties": {
                            TRACEPARENT_HEADER: {"type": "string", "pattern": TRACEPARENT_PATTERN, "description": "the span of the delivery that published it, in the request's trace"},
                            "tracestate": {"type": "string"}
                        }
                    },
                    "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": "0.3.0"}},
                    "description": "`message_id` is `<request_id>#<seq>`. An event with `rejected_message` answers one message (refused: invalid, forged, too old) rather than the request."
                }
            }
        }
    })
}
