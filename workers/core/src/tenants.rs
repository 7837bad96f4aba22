//! Who a producer is, and which tenant it may spend: the binding of authenticated
//! identities (a signing key's id, a broker user the broker vouched for in `user_id`) to
//! tenants (`TENANTS`). Without a binding a request's `tenant` is the producer's word;
//! with one, a producer may name only its own tenant, and must name it, and acts only on
//! resources whose recorded end names its tenant (the runtime's `refuse_unless_owned`).

use std::collections::HashMap;

/// The tenant an identity may act for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// Exactly this tenant: its requests must name it.
    Tenant(String),
    /// Any tenant, or none (`*`: an operator's key or user).
    Any,
}

/// `TENANTS`: `key:<signing key id>=<tenant>` and `user:<broker user>=<tenant>`, comma-
/// separated; `*` as the tenant binds an operator, who may name any tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantBinding {
    by_key: HashMap<String, Bound>,
    by_user: HashMap<String, Bound>,
}

impl TenantBinding {
    pub fn parse(setting: &str) -> Result<TenantBinding, String> {
        let mut binding = TenantBinding::default();
        for entry in setting.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (who, tenant) = entry.split_once('=').ok_or_else(|| {
                format!("{entry:?} is not key:<id>=<tenant> or user:<name>=<tenant>")
            })?;
            let tenant = tenant.trim();
            if tenant.is_empty() {
                return Err(format!("{entry:?} names no tenant"));
            }
            let bound = if tenant == "*" {
                Bound::Any
            } else {
                Bound::Tenant(tenant.to_owned())
            };
            let (map, name) = match who.trim().split_once(':') {
                Some(("key", id)) => (&mut binding.by_key, id),
                Some(("user", name)) => (&mut binding.by_user, name),
                _ => {
                    return Err(format!(
                        "{entry:?}: say whose it is, key:<signing key id> or user:<broker user>"
                    ));
                }
            };
            if name.is_empty() || map.insert(name.to_owned(), bound).is_some() {
                return Err(format!("{entry:?}: an empty or repeated identity"));
            }
        }
        Ok(binding)
    }

    /// Whether the request's `tenant` is one the producer may name. `key` is the id of
    /// the key that signed the message (verified), `user` the broker user the broker
    /// vouched for in its `user_id`; the key wins when both are known. The error says
    /// what to change.
    pub fn check(
        &self,
        key: Option<&str>,
        user: Option<&str>,
        tenant: Option<&str>,
    ) -> Result<&Bound, String> {
        let (bound, who) = match (
            key.and_then(|k| self.by_key.get(k)),
            user.and_then(|u| self.by_user.get(u)),
        ) {
            (Some(bound), _) => (bound, format!("signing key {:?}", key.unwrap_or_default())),
            (None, Some(bound)) => (bound, format!("broker user {:?}", user.unwrap_or_default())),
            (None, None) => {
                return Err(format!(
                    "this deployment binds producers to tenants (TENANTS), and this message's producer is bound to none ({}); it may not provision or act on anything",
                    match (key, user) {
                        (Some(key), _) => format!("signed with key {key:?}"),
                        (None, Some(user)) => format!("published by broker user {user:?}"),
                        (None, None) => "unsigned, and without a user_id".to_owned(),
                    }
                ));
            }
        };
        match (bound, tenant) {
            (Bound::Any, _) => Ok(bound),
            (Bound::Tenant(own), Some(named)) if own == named => Ok(bound),
            (Bound::Tenant(own), Some(named)) => Err(format!(
                "the {who} is bound to tenant {own:?}, not {named:?}: a producer spends only its own tenant's quota"
            )),
            (Bound::Tenant(own), None) => Err(format!(
                "the {who} is bound to tenant {own:?}: name it (\"tenant\": {own:?}), so the request counts against its quota"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_producer_names_its_own_tenant_and_only_it() {
        let binding =
            TenantBinding::parse("key:k1=team-a, user:svc-b=team-b, key:ops=*").expect("parse");
        binding
            .check(Some("k1"), None, Some("team-a"))
            .expect("its own");
        assert!(
            binding
                .check(Some("k1"), None, Some("team-b"))
                .expect_err("refused")
                .contains("bound to tenant \"team-a\"")
        );
        assert!(
            binding
                .check(Some("k1"), None, None)
                .expect_err("refused")
                .contains("name it")
        );
        binding
            .check(None, Some("svc-b"), Some("team-b"))
            .expect("by user");
        assert!(
            binding
                .check(None, Some("svc-c"), Some("team-b"))
                .expect_err("refused")
                .contains("bound to none")
        );
        assert!(
            binding
                .check(None, None, Some("team-a"))
                .expect_err("refused")
                .contains("without a user_id")
        );
        // The key wins over the user.
        assert!(
            binding
                .check(Some("k1"), Some("svc-b"), Some("team-b"))
                .is_err()
        );
        binding
            .check(Some("ops"), None, Some("anyone"))
            .expect("an operator");
        binding
            .check(Some("ops"), None, None)
            .expect("an operator, no tenant");
        for bad in [
            "k1=team-a",
            "key:k1=",
            "key:=a",
            "key:k1=a,key:k1=b",
            "nothing",
        ] {
            assert!(TenantBinding::parse(bad).is_err(), "{bad}");
        }
    }
}
