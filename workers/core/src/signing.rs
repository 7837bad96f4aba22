//! Signed requests: who may have a worker make machines, when the broker is not trusted
//! to say so alone.
//!
//! A deployment that turns signing on gives its producers and workers shared keys,
//! each with an id. A producer signs each request it publishes with one key; the header
//! `x-provisioner-signature: key=<id>,t=<unix seconds>,v1=<hex>` carries the key's id,
//! the time of signing and the HMAC-SHA256, under the key, of
//!
//! ```text
//! v1\n<key id>\n<t>\n<routing key>\n<the message body, byte for byte>
//! ```
//!
//! Signing the exact bytes (not a re-serialised form) means any producer, in any
//! language, signs what it sends without a canonical JSON of its own.
//!
//! A worker verifies every message that came through the producers' exchange: a message
//! without a signature, signed with a key it does not hold, altered after signing (body
//! or routing key), or signed longer ago than the allowed age (or too far in the future)
//! is refused with class `permission` and dead-lettered, and never runs. The refusal
//! answers that message only (`rejected_message`), so a forged message cannot end, or
//! speak for, the real request that has its id. Messages the workers publish themselves
//! (fleet members, expiry teardowns, parked retries) come through the workers' own
//! exchanges, which only workers may write (see the broker users in `provisioner
//! definitions`), and are not signed again.
//!
//! Keys rotate without downtime: workers hold every key still valid (the new and the
//! old); producers move to the new key; the old key is then removed from the workers.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};

/// The AMQP header carrying a request's signature (as the AsyncAPI document names it).
pub const SIGNATURE_HEADER: &str = provisioner_events::asyncapi::SIGNATURE_HEADER;

/// How far in the future a signature's time may be (clocks differ).
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// The shortest key accepted: HMAC-SHA256 wants at least 32 bytes of secret.
const MIN_KEY_BYTES: usize = 32;

type HmacSha256 = hmac::Hmac<sha2_hmac::Sha256>;

/// The keys a deployment signs and verifies with, by id; the first is the one producers
/// sign with.
#[derive(Clone)]
pub struct SigningKeys {
    keys: Vec<(String, Vec<u8>)>,
    by_id: BTreeMap<String, usize>,
    /// Signatures older than this are refused as stale.
    pub max_age: Duration,
}

impl std::fmt::Debug for SigningKeys {
    /// Names the keys, never shows them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field(
                "ids",
                &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .field("max_age", &self.max_age)
            .finish()
    }
}

impl SigningKeys {
    /// Reads `id=secret,id=secret`: each secret at least 32 bytes, the first key the
    /// one to sign with. The error names what is wrong, never a secret.
    pub fn parse(spec: &str, max_age: Duration) -> Result<SigningKeys, String> {
        let mut keys = Vec::new();
        let mut by_id = BTreeMap::new();
        for (position, entry) in spec
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let Some((id, secret)) = entry.split_once('=') else {
                return Err(format!("key {} is not `id=secret`", position + 1));
            };
            let id = id.trim();
            if id.is_empty()
                || id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(format!(
                    "key {}: its id must be 1 to 64 letters, digits, `-`, `_` or `.`",
                    position + 1
                ));
            }
            if secret.len() < MIN_KEY_BYTES {
                return Err(format!(
                    "key {id:?} is shorter than {MIN_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`)"
                ));
            }
            if by_id.insert(id.to_owned(), keys.len()).is_some() {
                return Err(format!("key {id:?} is given twice"));
            }
            keys.push((id.to_owned(), secret.as_bytes().to_vec()));
        }
        if keys.is_empty() {
            return Err("no key given".into());
        }
        Ok(SigningKeys {
            keys,
            by_id,
            max_age,
        })
    }

    /// The keys a process is given: `REQUEST_SIGNING_KEYS` (`keys`) or the file
    /// `REQUEST_SIGNING_KEYS_FILE` names (`file`), one `id=secret` a line, never both.
    /// Neither: the deployment does not sign.
    pub fn from_settings(
        keys: Option<&str>,
        file: Option<&std::path::Path>,
        max_age: Duration,
    ) -> Result<Option<SigningKeys>, String> {
        let spec = match (keys, file) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(
                    "REQUEST_SIGNING_KEYS and REQUEST_SIGNING_KEYS_FILE are both set: give one"
                        .into(),
                );
            }
            (Some(keys), None) => keys.to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("REQUEST_SIGNING_KEYS_FILE {}: {e}", path.display()))?,
        };
        SigningKeys::parse(&spec, max_age)
            .map(Some)
            .map_err(|e| format!("request signing keys: {e}"))
    }

    /// The signature header of a message, signed now with the first key.
    pub fn sign(&self, routing_key: &str, body: &[u8]) -> String {
        let (id, secret) = &self.keys[0];
        sign_with(id, secret, routing_key, body, SystemTime::now())
    }

    /// Checks a message's signature header; the error says what is wrong with it, for a
    /// person to act on. A valid signature older than the allowed age is not an error
    /// here: [`Verified::stale`] says so, and the caller refuses it unless the request is
    /// one it already accepted (a delivery again after a worker died with it is answered
    /// by its record). Nothing unsigned is trusted for that: not the broker's
    /// `redelivered` flag, which a replay through a dying consumer also gets.
    pub fn verify(
        &self,
        header: Option<&str>,
        routing_key: &str,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Verified, String> {
        let Some(header) = header else {
            return Err(format!(
                "the message is not signed: this deployment runs only requests signed with one of its keys (header {SIGNATURE_HEADER})"
            ));
        };
        let parsed = Signature::parse(header).ok_or_else(|| {
            format!("the {SIGNATURE_HEADER} header is not `key=<id>,t=<unix seconds>,v1=<hex>`")
        })?;
        let Some(&index) = self.by_id.get(parsed.key_id) else {
            return Err(format!(
                "the message is signed with key {:?}, which this worker does not hold (retired, or never issued)",
                bounded(parsed.key_id)
            ));
        };
        let mut mac = HmacSha256::new_from_slice(&self.keys[index].1)
            .expect("HMAC takes a key of any length");
        signed_text(&mut mac, parsed.key_id, parsed.at, routing_key, body);
        if mac.verify_slice(&parsed.mac).is_err() {
            return Err(
                "the signature does not match the message: it was altered after signing (body or routing key), or signed with another secret"
                    .into(),
            );
        }
        let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if parsed.at > now_s.saturating_add(CLOCK_SKEW.as_secs()) {
            return Err(format!(
                "the message is signed {} s in the future; check the producer's clock",
                parsed.at - now_s
            ));
        }
        let age = now_s.saturating_sub(parsed.at);
        Ok(Verified {
            key_id: parsed.key_id.to_owned(),
            signed_at: UNIX_EPOCH + Duration::from_secs(parsed.at),
            stale: (age > self.max_age.as_secs()).then(|| {
                format!(
                    "the signature is stale: made {age} s ago, more than the {} s allowed; publish the request again, signed anew",
                    self.max_age.as_secs()
                )
            }),
        })
    }
}

/// A signature that matches its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The key that signed it: who the producer is, for a binding of keys to tenants.
    pub key_id: String,
    /// When it was signed: the time the worker trusts (the AMQP `timestamp` is not signed).
    pub signed_at: SystemTime,
    /// Why it is too old to run, when it is.
    pub stale: Option<String>,
}

/// The signature header of a message signed with `secret` (named `key_id`) at `at`.
pub fn sign_with(
    key_id: &str,
    secret: &[u8],
    routing_key: &str,
    body: &[u8],
    at: SystemTime,
) -> String {
    let at = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    signed_text(&mut mac, key_id, at, routing_key, body);
    let hex = finished_hex(mac);
    format!("key={key_id},t={at},v1={hex}")
}

/// The MAC, in lowercase hex.
fn finished_hex(mac: HmacSha256) -> String {
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn signed_text(mac: &mut HmacSha256, key_id: &str, at: u64, routing_key: &str, body: &[u8]) {
    mac.update(format!("v1\n{key_id}\n{at}\n{routing_key}\n").as_bytes());
    mac.update(body);
}

/// The first word of a sealed store entry ([`SigningKeys::seal`]).
const SEAL_TAG: &str = "sealed-v1";

/// A stored entry whose seal holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened<'a> {
    /// What was sealed.
    pub body: &'a str,
    /// Whether it was sealed with the key this deployment now signs with; if not, the
    /// caller seals it again (at `sealed_at`) so that the old key can be retired.
    pub current_key: bool,
    /// When it was sealed: a seal made again keeps this time, so sealing anew never
    /// makes an entry live longer than its first seal allows.
    pub sealed_at: SystemTime,
}

impl SigningKeys {
    /// Seals `body`, an entry a worker keeps in the store to act on later, under `what`
    /// (the entry's kind, platform and id, e.g. `fleet docker/web`): the entry as stored is
    /// `sealed-v1 key=<id>,t=<unix seconds>,mac=<hex>` and a newline before the body, the
    /// MAC the HMAC-SHA256, under the first key, of
    ///
    /// ```text
    /// store-v1\n<key id>\n<t>\n<what>\n<body>
    /// ```
    ///
    /// A holder of the store's credentials without the keys cannot make an entry a worker
    /// accepts, nor move a real one to another platform or id (`what` is sealed), nor
    /// bring one back after `max_age` (the time is sealed). The text differs from a
    /// request signature's from its first line, so neither can pass for the other.
    pub fn seal(&self, what: &str, body: &str, now: SystemTime) -> String {
        let (id, secret) = &self.keys[0];
        let at = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
        sealed_text(&mut mac, id, at, what, body);
        let hex = finished_hex(mac);
        format!("{SEAL_TAG} key={id},t={at},mac={hex}\n{body}")
    }

    /// Opens an entry [`SigningKeys::seal`] made for `what`: its body, when it is sealed
    /// with a held key, unaltered, sealed for `what`, and no older than `max_age`. The
    /// error says what is wrong, never a secret.
    pub fn open<'a>(
        &self,
        what: &str,
        stored: &'a str,
        now: SystemTime,
        max_age: Duration,
    ) -> Result<Opened<'a>, String> {
        let Some((first, body)) = stored
            .strip_prefix(SEAL_TAG)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|rest| rest.split_once('\n'))
        else {
            return Err(format!(
                "it is not sealed: every entry a worker acts on is sealed with the signing keys when signing is on ({what})"
            ));
        };
        let parsed = first
            .strip_prefix("key=")
            .and_then(|rest| rest.split_once(",t="))
            .and_then(|(key, rest)| rest.split_once(",mac=").map(|(at, mac)| (key, at, mac)))
            .and_then(|(key, at, mac)| Some((key, at.parse::<u64>().ok()?, from_hex(mac)?)));
        let Some((key_id, at, expected)) = parsed else {
            return Err(format!(
                "its seal is not `key=<id>,t=<unix seconds>,mac=<hex>` ({what})"
            ));
        };
        let Some(&index) = self.by_id.get(key_id) else {
            return Err(format!(
                "it is sealed with key {:?}, which this worker does not hold ({what})",
                bounded(key_id)
            ));
        };
        let mut mac = HmacSha256::new_from_slice(&self.keys[index].1)
            .expect("HMAC takes a key of any length");
        sealed_text(&mut mac, key_id, at, what, body);
        if mac.verify_slice(&expected).is_err() {
            return Err(format!(
                "its seal does not match: altered, moved from another entry, or sealed with another secret ({what})"
            ));
        }
        let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if at > now_s.saturating_add(CLOCK_SKEW.as_secs()) {
            return Err(format!(
                "it is sealed {} s in the future ({what})",
                at - now_s
            ));
        }
        if now_s.saturating_sub(at) > max_age.as_secs() {
            return Err(format!(
                "it was sealed {} s ago, longer than any entry lives ({} s): an old entry put back ({what})",
                now_s - at,
                max_age.as_secs()
            ));
        }
        Ok(Opened {
            body,
            current_key: index == 0,
            sealed_at: UNIX_EPOCH + Duration::from_secs(at),
        })
    }
}

/// The body of a stored entry, sealed or not, without checking a seal: for a deployment
/// that does not sign (whose store is then as trusted as its broker).
pub fn unsealed_body(stored: &str) -> &str {
    match stored
        .strip_prefix(SEAL_TAG)
        .and_then(|rest| rest.split_once('\n'))
    {
        Some((_, body)) => body,
        None => stored,
    }
}

fn sealed_text(mac: &mut HmacSha256, key_id: &str, at: u64, what: &str, body: &str) {
    mac.update(format!("store-v1\n{key_id}\n{at}\n{what}\n").as_bytes());
    mac.update(body.as_bytes());
}

fn bounded(text: &str) -> String {
    text.chars().take(64).collect()
}

struct Signature<'a> {
    key_id: &'a str,
    at: u64,
    mac: Vec<u8>,
}

impl<'a> Signature<'a> {
    fn parse(header: &'a str) -> Option<Signature<'a>> {
        let (mut key_id, mut at, mut mac) = (None, None, None);
        for part in header.split(',') {
            let (name, value) = part.trim().split_once('=')?;
            match name {
                "key" => key_id = Some(value),
                "t" => at = Some(value.parse().ok()?),
                "v1" => mac = Some(from_hex(value)?),
                _ => {}
            }
        }
        Some(Signature {
            key_id: key_id?,
            at: at?,
            mac: mac?,
        })
    }
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "old-secret-0123456789abcdef0123456789";
    const NEW: &str = "new-secret-0123456789abcdef0123456789";

    fn keys() -> SigningKeys {
        SigningKeys::parse(&format!("new={NEW}, old={OLD}"), Duration::from_secs(600))
            .expect("keys")
    }

    #[test]
    fn a_sealed_entry_opens_only_unaltered_in_its_place_with_a_held_key_and_while_fresh() {
        let now = SystemTime::now();
        let week = Duration::from_secs(7 * 24 * 3600);
        let keys = keys();
        let body = r#"{"request_id":"web","count":3}"#;
        let sealed = keys.seal("fleet docker/web", body, now);
        let opened = keys
            .open("fleet docker/web", &sealed, now, week)
            .expect("opens");
        assert_eq!(opened.body, body);
        assert!(opened.current_key);
        assert_eq!(unsealed_body(&sealed), body);
        assert_eq!(unsealed_body(body), body);

        let refused = |what: &str, stored: &str, at: SystemTime| {
            keys.open(what, stored, at, week).expect_err("refused")
        };
        assert!(refused("fleet docker/web", body, now).contains("not sealed"));
        let altered = sealed.replace("\"count\":3", "\"count\":300");
        assert!(refused("fleet docker/web", &altered, now).contains("does not match"));
        // Moved to another id or platform: the place is sealed with it.
        assert!(refused("fleet docker/other", &sealed, now).contains("does not match"));
        assert!(refused("fleet aws-ec2/web", &sealed, now).contains("does not match"));
        // Put back after every entry of its kind is gone.
        let later = now + week + Duration::from_secs(3600);
        assert!(refused("fleet docker/web", &sealed, later).contains("put back"));
        // A key nobody holds, and a request signature passed off as a seal.
        let stranger = SigningKeys::parse(
            "other=another-secret-0123456789abcdef01234",
            Duration::from_secs(600),
        )
        .expect("keys")
        .seal("fleet docker/web", body, now);
        assert!(refused("fleet docker/web", &stranger, now).contains("does not hold"));
        let signature = keys.sign("fleet docker/web", body.as_bytes());
        let passed_off = format!("sealed-v1 {}\n{body}", signature.replace("v1=", "mac="));
        assert!(refused("fleet docker/web", &passed_off, now).contains("does not match"));
        // Sealed with the old key: opens, and says it wants sealing again.
        let old = SigningKeys::parse(&format!("old={OLD}"), Duration::from_secs(600))
            .expect("keys")
            .seal("fleet docker/web", body, now);
        assert!(
            !keys
                .open("fleet docker/web", &old, now, week)
                .expect("opens")
                .current_key
        );
    }

    #[test]
    fn a_message_signed_with_any_held_key_passes_and_every_alteration_fails() {
        let now = SystemTime::now();
        let body = br#"{"request_id":"a"}"#;
        let keys = keys();
        let signed = keys.sign("docker.provision", body);
        assert!(signed.starts_with("key=new,t="), "{signed}");
        let fresh = |header: &str| {
            keys.verify(Some(header), "docker.provision", body, now)
                .expect("verified")
                .stale
                .is_none()
        };
        assert!(fresh(&signed));
        let by_old = sign_with("old", OLD.as_bytes(), "docker.provision", body, now);
        assert!(fresh(&by_old));

        let refused = |header: Option<&str>, key: &str, body: &[u8]| {
            keys.verify(header, key, body, now).expect_err("refused")
        };
        assert!(refused(None, "docker.provision", body).contains("not signed"));
        assert!(
            refused(Some(&signed), "docker.provision", br#"{"request_id":"b"}"#)
                .contains("altered")
        );
        assert!(refused(Some(&signed), "docker.teardown", body).contains("altered"));
        let foreign = sign_with(
            "old",
            b"another-secret-0123456789abcdef01234",
            "docker.provision",
            body,
            now,
        );
        assert!(refused(Some(&foreign), "docker.provision", body).contains("altered"));
        let retired = sign_with("older", OLD.as_bytes(), "docker.provision", body, now);
        assert!(refused(Some(&retired), "docker.provision", body).contains("does not hold"));
        let stale = sign_with(
            "new",
            NEW.as_bytes(),
            "docker.provision",
            body,
            now - Duration::from_secs(601),
        );
        // Stale, and said so with the signed time; the caller refuses it unless it
        // already accepted the request.
        let verified = keys
            .verify(Some(&stale), "docker.provision", body, now)
            .expect("the signature matches");
        assert!(verified.stale.expect("stale").contains("stale"));
        assert_eq!(
            verified
                .signed_at
                .duration_since(UNIX_EPOCH)
                .expect("after")
                .as_secs(),
            (now - Duration::from_secs(601))
                .duration_since(UNIX_EPOCH)
                .expect("after")
                .as_secs()
        );
        assert!(refused(Some(&stale), "docker.teardown", body).contains("altered"));
        let future = sign_with(
            "new",
            NEW.as_bytes(),
            "docker.provision",
            body,
            now + Duration::from_secs(900),
        );
        assert!(refused(Some(&future), "docker.provision", body).contains("future"));
        assert!(refused(Some("v1=zz"), "docker.provision", body).contains("header is not"));
        // The time is signed too: moving it makes the signature wrong.
        let moved = signed.replacen(",t=", ",t=1", 1);
        assert!(refused(Some(&moved), "docker.provision", body).contains("altered"));
    }

    #[test]
    fn keys_are_checked_and_never_shown() {
        assert!(SigningKeys::parse("", Duration::ZERO).is_err());
        assert!(
            SigningKeys::parse("k=short", Duration::ZERO)
                .expect_err("short")
                .contains("shorter than 32")
        );
        assert!(
            SigningKeys::parse(&format!("k={NEW},k={OLD}"), Duration::ZERO)
                .expect_err("twice")
                .contains("twice")
        );
        assert!(SigningKeys::parse(&format!("bad id={NEW}"), Duration::ZERO).is_err());
        let shown = format!("{:?}", keys());
        assert!(
            !shown.contains(NEW) && !shown.contains(OLD) && shown.contains("old"),
            "{shown}"
        );
    }
}
