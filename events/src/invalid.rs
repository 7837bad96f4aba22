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

/// `format!` into an [`Invalid`].
macro_rules! invalid {
    ($($message:tt)*) => {
        $crate::Invalid(format!($($message)*))
    };
}
pub(crate) use invalid;
