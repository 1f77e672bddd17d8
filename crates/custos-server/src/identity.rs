//! Policies as the broker holds them, and the one place requests are authorised.
//!
//! Policies come from the configuration file (read-only) and from the API (stored in the
//! database). Both live in a [`PolicyStore`] that request handling reads without touching
//! the database; the API reloads it after every change.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::http::StatusCode;
use custos_core::policy::{evaluate, Capability, Decision, Policy, Rule};
use custos_core::SecretPath;
use custos_storage::policies::PolicyRepository;
use custos_storage::StorageError;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::token::Principal;

/// The policy that grants everything; only root tokens hold it.
pub const ROOT_POLICY: &str = "root";

/// A policy's rules as JSON, in the API and in the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    pub rules: Vec<RuleDocument>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDocument {
    pub path: String,
    pub capabilities: Vec<String>,
}

impl PolicyDocument {
    /// The policy these rules make, or a message naming the bad rule.
    pub fn to_policy(&self, name: &str) -> Result<Policy, String> {
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let capabilities: Vec<&str> =
                    rule.capabilities.iter().map(String::as_str).collect();
                Rule::new(&rule.path, &capabilities)
                    .map_err(|error| format!("rules[{index}]: {error}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Policy::new(name, rules).map_err(|error| error.to_string())
    }
}

/// Every policy the broker knows, by name.
#[derive(Debug)]
pub struct PolicyStore {
    configured: BTreeMap<String, (Policy, PolicyDocument)>,
    stored: RwLock<BTreeMap<String, (Policy, PolicyDocument)>>,
    repository: PolicyRepository,
}

impl PolicyStore {
    /// A store with the configuration's policies; call [`Self::reload`] for stored ones.
    pub fn new(
        configured: Vec<(Policy, PolicyDocument)>,
        repository: PolicyRepository,
    ) -> Arc<Self> {
        Arc::new(Self {
            configured: configured
                .into_iter()
                .map(|(policy, document)| (policy.name.clone(), (policy, document)))
                .collect(),
            stored: RwLock::new(BTreeMap::new()),
            repository,
        })
    }

    /// Re-reads the policies stored through the API. Stored rules that no longer parse
    /// are skipped with an error in the log (they grant nothing).
    pub async fn reload(&self) -> Result<(), StorageError> {
        let mut stored = BTreeMap::new();
        for (name, rules) in self.repository.all().await? {
            let parsed = serde_json::from_str::<PolicyDocument>(&rules)
                .map_err(|error| error.to_string())
                .and_then(|document| Ok((document.to_policy(&name)?, document)));
            match parsed {
                Ok(entry) => {
                    stored.insert(name, entry);
                }
                Err(error) => tracing::error!(policy = %name, %error, "stored policy skipped"),
            }
        }
        *self
            .stored
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = stored;
        Ok(())
    }

    pub fn is_configured(&self, name: &str) -> bool {
        self.configured.contains_key(name)
    }

    pub fn repository(&self) -> &PolicyRepository {
        &self.repository
    }

    /// A policy's document and where it comes from (`config` or `api`).
    pub fn document(&self, name: &str) -> Option<(PolicyDocument, &'static str)> {
        if let Some((_, document)) = self.configured.get(name) {
            return Some((document.clone(), "config"));
        }
        let stored = self
            .stored
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        stored
            .get(name)
            .map(|(_, document)| (document.clone(), "api"))
    }

    /// Every policy name.
    pub fn names(&self) -> Vec<String> {
        let stored = self
            .stored
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut names: Vec<String> = self
            .configured
            .keys()
            .chain(stored.keys())
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether every name is a known policy.
    pub fn unknown<'a>(&self, names: &'a [String]) -> Option<&'a str> {
        let known = self.names();
        names
            .iter()
            .find(|name| name.as_str() != ROOT_POLICY && !known.contains(name))
            .map(String::as_str)
    }

    /// Decides `capability` on `path` for `principal`.
    pub fn decide(
        &self,
        principal: &Principal,
        path: &SecretPath,
        capability: Capability,
    ) -> Decision {
        if principal.is_root || principal.policies.iter().any(|name| name == ROOT_POLICY) {
            return Decision::Allow;
        }
        let stored = self
            .stored
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let policies: Vec<&Policy> = principal
            .policies
            .iter()
            .filter_map(|name| {
                self.configured
                    .get(name)
                    .or_else(|| stored.get(name))
                    .map(|(policy, _)| policy)
            })
            .collect();
        evaluate(policies, path, capability)
    }

    /// `Ok` when allowed, a 403 naming the capability and path otherwise.
    pub fn authorize(
        &self,
        principal: &Principal,
        path: &SecretPath,
        capability: Capability,
    ) -> Result<(), ApiError> {
        match self.decide(principal, path, capability) {
            Decision::Allow => Ok(()),
            Decision::ExplicitDeny { .. } | Decision::DefaultDeny => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the token's policies do not grant {capability} on {path}"),
            )),
        }
    }
}

/// The path on which a system capability is checked, such as `sys/audit`.
pub fn system_path(area: &str) -> SecretPath {
    SecretPath::parse(&format!("sys/{area}")).expect("system paths are valid")
}
