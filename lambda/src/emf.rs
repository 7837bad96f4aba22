//! An invocation's metrics as CloudWatch Embedded Metric Format (EMF) log lines.
//!
//! A function has no `/metrics` endpoint to scrape. CloudWatch makes metrics of log
//! lines in EMF instead, with no API call and no agent. Each invocation's worker counts
//! in the very families the daemon serves (see `provisioner_core::metrics`). At its end,
//! its counters and its histograms' `_sum` and `_count` become EMF lines. The labels
//! become dimensions, one line per label set. So the function and the daemon are read
//! with the same names, and each line holds that invocation's increments.

use std::collections::BTreeMap;

/// A sample's labels, name and value pairs.
type Labels = Vec<(String, String)>;
/// A metric of a line: its name, CloudWatch unit and value.
type Metric = (String, &'static str, f64);

/// The EMF lines of an invocation whose metrics `openmetrics` holds (the OpenMetrics text
/// of its registry), in `namespace`, stamped `timestamp_ms`. Samples at zero and
/// histogram buckets are left out.
pub fn lines(openmetrics: &str, namespace: &str, timestamp_ms: u128) -> Vec<String> {
    let mut by_labels: BTreeMap<Labels, Vec<Metric>> = BTreeMap::new();
    for line in openmetrics.lines() {
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        let unit = if name.ends_with("_seconds_sum") {
            "Seconds"
        } else if name.ends_with("_total") || name.ends_with("_count") {
            "Count"
        } else {
            // Gauges say how things stand at a moment, which an invocation's end is not;
            // `_bucket` and `_created` lines are not values to sum.
            continue;
        };
        if value == 0.0 {
            continue;
        }
        // CloudWatch takes no empty dimension value: an empty label is no dimension.
        let mut labels: Labels = labels.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        labels.sort();
        by_labels
            .entry(labels)
            .or_default()
            .push((name.to_owned(), unit, value));
    }
    by_labels
        .into_iter()
        .map(|(labels, metrics)| {
            let mut line = serde_json::Map::new();
            line.insert(
                "_aws".into(),
                serde_json::json!({
                    "Timestamp": timestamp_ms as u64,
                    "CloudWatchMetrics": [{
                        "Namespace": namespace,
                        "Dimensions": [labels.iter().map(|(k, _)| k).collect::<Vec<_>>()],
                        "Metrics": metrics.iter()
                            .map(|(name, unit, _)| serde_json::json!({"Name": name, "Unit": unit}))
                            .collect::<Vec<_>>(),
                    }],
                }),
            );
            for (key, value) in labels {
                line.insert(key, value.into());
            }
            for (name, _, value) in metrics {
                line.insert(name, value.into());
            }
            serde_json::Value::Object(line).to_string()
        })
        .collect()
}

/// One sample line of the OpenMetrics text: `name{label="value",…} value`.
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series, Vec::new(), value));
    };
    let mut labels = Vec::new();
    let mut chars = rest.strip_suffix('}')?.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_owned(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name, labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histogram_sums_become_one_line_per_label_set() {
        let text = r#"# HELP provisioner_requests Requests that ended
# TYPE provisioner_requests counter
provisioner_requests_total{platform="aws-ec2",operation="provision",outcome="running",error_class=""} 2
provisioner_requests_total{platform="aws-ec2",operation="teardown",outcome="error",error_class="permission"} 1
provisioner_deliveries_total{platform="aws-ec2",settlement="ack"} 0
provisioner_platform_call_duration_seconds_sum{platform="aws-ec2",operation="provision",outcome="ok"} 1.5
provisioner_platform_call_duration_seconds_count{platform="aws-ec2",operation="provision",outcome="ok"} 2
provisioner_platform_call_duration_seconds_bucket{platform="aws-ec2",operation="provision",outcome="ok",le="0.1"} 0
provisioner_in_flight{platform="aws-ec2"} 3
provisioner_odd_total{platform="a \"quoted\", odd\\one"} 1
# EOF
"#;
        let lines: Vec<serde_json::Value> = lines(text, "provisioner", 1_700_000_000_000)
            .iter()
            .map(|line| serde_json::from_str(line).expect("JSON"))
            .collect();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        let running = lines
            .iter()
            .find(|l| l["outcome"] == "running")
            .expect("the running requests");
        assert_eq!(running["provisioner_requests_total"], 2.0);
        assert!(running.get("error_class").is_none(), "no empty dimension");
        assert_eq!(
            running["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            serde_json::json!([["operation", "outcome", "platform"]])
        );
        assert_eq!(running["_aws"]["Timestamp"], 1_700_000_000_000u64);
        let call = lines
            .iter()
            .find(|l| l["outcome"] == "ok")
            .expect("the platform call");
        assert_eq!(call["provisioner_platform_call_duration_seconds_sum"], 1.5);
        assert_eq!(
            call["provisioner_platform_call_duration_seconds_count"],
            2.0
        );
        assert_eq!(
            call["_aws"]["CloudWatchMetrics"][0]["Metrics"],
            serde_json::json!([
                {"Name": "provisioner_platform_call_duration_seconds_sum", "Unit": "Seconds"},
                {"Name": "provisioner_platform_call_duration_seconds_count", "Unit": "Count"},
            ])
        );
        assert!(
            lines
                .iter()
                .any(|l| l["platform"] == "a \"quoted\", odd\\one"),
            "escapes read: {lines:#?}"
        );
        assert!(
            !lines
                .iter()
                .any(|l| l.get("provisioner_in_flight").is_some()),
            "no gauge"
        );
    }
}
