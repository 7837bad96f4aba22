//! Operators' allow-lists (images, networks' neighbours, environment names, status
//! publishers, tenants' users): one pattern syntax everywhere, a literal or a `prefix*`.

/// Whether `value` equals `pattern`, or starts with it when it ends in `*`.
pub fn matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => value == pattern,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pattern_is_a_literal_or_a_prefix() {
        assert!(super::matches("APP_*", "APP_MODE"));
        assert!(super::matches("APP_*", "APP_"));
        assert!(!super::matches("APP_*", "XAPP_MODE"));
        assert!(super::matches("PATH", "PATH"));
        assert!(!super::matches("PATH", "PATHX"));
        assert!(super::matches("*", "anything"));
    }
}
