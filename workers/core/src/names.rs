//! Names derived from a request id, so that every attempt at a request (a retry, another
//! worker's takeover) addresses the same platform resource, which is what makes create
//! calls idempotent on platforms that key resources by name.

use sha2::{Digest, Sha256};

/// `prov-<readable>-<hash>`: the request id lowercased with every other character turned
/// into `-`, cut to `readable_max` characters, and 8 hex digits of its SHA-256 so that ids
/// differing only in case or punctuation never share a name. The result is an RFC 1035
/// label (a lowercase letter first, no `-` last) of at most `readable_max + 14`
/// characters, which Kubernetes, Compute Engine, Cloud Run and Azure all accept.
pub fn derived_name(request_id: &str, readable_max: usize) -> String {
    let hash: String = Sha256::digest(request_id.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut readable = String::new();
    for c in request_id.chars() {
        if readable.len() >= readable_max {
            break;
        }
        if c.is_ascii_alphanumeric() {
            readable.push(c.to_ascii_lowercase());
        } else if !readable.ends_with('-') {
            // One hyphen for any run of other characters: Azure refuses consecutive
            // hyphens in container group names (`job--1`, `a._b`).
            readable.push('-');
        }
    }
    let readable = readable.trim_matches('-');
    if readable.is_empty() {
        format!("prov-{hash}")
    } else {
        format!("prov-{readable}-{hash}")
    }
}

/// A fleet member's request id `<fleet>#<index>` split into the fleet's id and the
/// member's index; `None` for any other id (a member's follow-up such as
/// `<fleet>#3.rollback` included).
pub fn fleet_member_parts(request_id: &str) -> Option<(&str, u32)> {
    let (fleet, index) = request_id.rsplit_once('#')?;
    if fleet.is_empty() || index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((fleet, index.parse().ok()?))
}

/// The request id of a request the workers send on their own about `request_id` (the
/// teardown of an expired or unexplained resource, a fleet's rollback), in the part of
/// the id space producers cannot use (`#`), so no producer's id ever takes it:
/// `<request_id>#<purpose>`, or `<fleet>#<i>.<purpose>` for a fleet member, and
/// `<SHA-256 of request_id>#<purpose>` when that would be too long. Fixed for a given
/// pair, so a second copy of such a request is a duplicate. `purpose` starts with a
/// lower-case letter.
pub fn follow_up_request_id(request_id: &str, purpose: &str) -> String {
    let separator = if request_id.contains('#') { '.' } else { '#' };
    let readable = format!("{request_id}{separator}{purpose}");
    if provisioner_events::RequestId::new(readable.as_str()).is_ok() {
        return readable;
    }
    let digest: String = Sha256::digest(request_id.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{digest}#{purpose}")
}

/// A version-4-shaped UUID that is a function of the request id, for APIs that take a
/// UUID idempotency key (Compute Engine's `requestId`): the same request always sends
/// the same key.
pub fn request_uuid(request_id: &str) -> String {
    let digest = Sha256::digest(format!("provisioner-request:{request_id}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_distinct_labels() {
        for id in ["web-1", "Web_1", "a.b.c", &"x".repeat(128), "9lives", "---"] {
            let name = derived_name(id, 30);
            assert!(name.len() <= 44, "{name}");
            assert!(name.starts_with("prov-") && !name.ends_with('-'), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
        }
        assert_ne!(derived_name("Web_1", 44), derived_name("web-1", 44));
        assert_eq!(derived_name("web-1", 44), derived_name("web-1", 44));
    }

    /// Every platform's naming rule, over many random ids: Kubernetes Services and
    /// Compute Engine instances (RFC 1035 labels, at most 63), Cloud Run services (at most
    /// 49), Azure container groups (no consecutive hyphens) and VMs (at most 64).
    #[test]
    fn derived_names_keep_every_platforms_rules_for_random_ids() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet: Vec<char> = "aZ09-_.:/@~ é-".chars().collect();
        for _ in 0..20_000 {
            let length = 1 + (next() % 128) as usize;
            let id: String = (0..length)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            for (readable_max, limit) in [(44, 63), (30, 49)] {
                let name = derived_name(&id, readable_max);
                assert!(name.len() <= limit, "{id:?} → {name}");
                assert!(name.starts_with(|c: char| c.is_ascii_lowercase()), "{name}");
                assert!(
                    name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()),
                    "{name}"
                );
                assert!(!name.contains("--"), "{id:?} → {name}");
                assert!(
                    name.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                    "{name}"
                );
            }
        }
        assert_eq!(
            derived_name("job--1", 44),
            format!("prov-job-1-{}", &derived_name("job--1", 0)[5..])
        );
    }

    #[test]
    fn request_uuids_are_stable_v4_shaped_uuids() {
        let id = request_uuid("web-1");
        assert_eq!(id, request_uuid("web-1"));
        assert_ne!(id, request_uuid("web-2"));
        let parsed = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 4);
        assert!(!parsed.is_nil());
    }
}
