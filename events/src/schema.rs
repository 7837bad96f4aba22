//! JSON Schemas generated from the types of this crate, for producers in other languages,
//! and the AsyncAPI document that names them ([`crate::asyncapi`]).
//! `events/schema/*.json` holds them committed; `tests/contract.rs` fails when they drift.
//! The spec schemas come from the one list of spec types, [`crate::spec::spec_schemas`].

use crate::{Request, StatusEvent};

/// Every published schema: its file name under `events/schema/` and its JSON text.
pub fn all() -> Vec<(String, String)> {
    let render = |schema: schemars::Schema| {
        let mut text = serde_json::to_string_pretty(&schema).expect("schemas serialize");
        text.push('\n');
        text
    };
    let mut schemas = vec![
        (
            "request.schema.json".to_owned(),
            render(schemars::schema_for!(Request)),
        ),
        (
            "status-event.schema.json".to_owned(),
            render(schemars::schema_for!(StatusEvent)),
        ),
    ];
    let mut asyncapi = serde_json::to_string_pretty(&crate::asyncapi::document())
        .expect("the document serializes");
    asyncapi.push('\n');
    schemas.push(("asyncapi.json".to_owned(), asyncapi));
    for (platform, schema) in crate::spec::spec_schemas() {
        schemas.push((
            format!("spec-{}.schema.json", platform.as_str()),
            render(schema),
        ));
    }
    schemas
}
