//! The one error of validation: why a request, its target or its spec is refused before
//! any work is done. Every check in this crate returns it, so the runtime (and anyone
//! reading the contract) knows a refusal by its type, never by its text, and it always
//! ends as an `invalid_request` rejection that names what to change.

/// Why a request, its target or its spec is refused, in words a person can act on:
/// which field, what it holds, and what is accepted instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    /// The explanation, as it goes into the rejection.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl From<String> for Invalid {
    fn from(message: String) -> Self {
        Invalid(message)
    }
}

impl From<&str> for Invalid {
    fn from(message: &str) -> Self {
        Invalid(message.to_owned())
    }
}

/// A deserializer's error without the string values it quotes (`invalid type: string
/// "hunter2", expected u16`): a refusal goes on the status topic every subscriber reads,
/// and a value in the wrong place may be a secret. The field's path and the expected type
/// stay; the value is named by its length.
pub fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("string \"") {
        out.push_str(&rest[..at]);
        let quoted = &rest[at + "string \"".len()..];
        // The value is Debug-escaped: it ends at the first quote not after a backslash.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        match end {
            Some(end) => {
                out.push_str(&format!(
                    "a string of {} characters",
                    quoted[..end].chars().count()
                ));
                rest = &quoted[end + 1..];
            }
            None => {
                out.push_str("a string");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// `format!` into an [`Invalid`].
macro_rules! invalid {
    ($($message:tt)*) => {
        $crate::Invalid(format!($($message)*))
    };
}
pub(crate) use invalid;

#[cfg(test)]
mod tests {
    use super::without_values;

    #[test]
    fn quoted_string_values_leave_a_deserializer_error() {
        assert_eq!(
            without_values(r#"invalid type: string "hunter2", expected u16 at line 1"#),
            "invalid type: a string of 7 characters, expected u16 at line 1"
        );
        assert_eq!(
            without_values(r#"invalid value: string "a\"b", expected x; string "c""#),
            "invalid value: a string of 4 characters, expected x; a string of 1 characters"
        );
        assert_eq!(
            without_values("missing field `image`"),
            "missing field `image`"
        );
        assert_eq!(without_values(r#"string "unterminated"#), "a string");
    }
}
