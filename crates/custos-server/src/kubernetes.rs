//! Kubernetes login: a workload's service-account token, checked by the API server's
//! TokenReview, mapped to policies by configured roles.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

/// A configured Kubernetes login role.
#[derive(Debug, Clone)]
pub struct KubernetesRole {
    pub name: String,
    /// Namespaces allowed to log in with this role; `*` allows any.
    pub namespaces: Vec<String>,
    /// Service accounts allowed; `*` allows any.
    pub service_accounts: Vec<String>,
    pub policies: Vec<String>,
    /// When not empty, the token must be valid for one of these audiences.
    pub audiences: Vec<String>,
    pub token_ttl: Duration,
    pub token_max_ttl: Duration,
}

/// How the broker reaches the Kubernetes API.
#[derive(Debug, Clone)]
pub struct KubernetesAuth {
    pub api_url: String,
    /// The broker's own token for TokenReview calls, re-read at every login because
    /// projected service-account tokens rotate.
    pub reviewer_token_file: Option<PathBuf>,
    pub http: reqwest::Client,
    pub roles: Vec<KubernetesRole>,
}

/// Who a reviewed token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    pub audiences: Vec<String>,
}

/// Why a login could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The token is not valid (or not for these audiences): a failed login.
    #[error("the token was not accepted")]
    Rejected,
    /// The API server could not be asked: not the workload's fault.
    #[error("the Kubernetes API did not answer usefully: {0}")]
    Unavailable(String),
}

impl KubernetesAuth {
    pub fn role(&self, name: &str) -> Option<&KubernetesRole> {
        self.roles.iter().find(|role| role.name == name)
    }

    /// Asks the API server who `jwt` belongs to.
    pub async fn review(
        &self,
        jwt: &str,
        audiences: &[String],
    ) -> Result<ServiceAccount, ReviewError> {
        let url = format!(
            "{}/apis/authentication.k8s.io/v1/tokenreviews",
            self.api_url.trim_end_matches('/')
        );
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": { "token": jwt, "audiences": audiences },
        });
        let mut request = self.http.post(&url).json(&body);
        if let Some(file) = &self.reviewer_token_file {
            let token = std::fs::read_to_string(file).map_err(|error| {
                ReviewError::Unavailable(format!(
                    "cannot read the reviewer token {}: {error}",
                    file.display()
                ))
            })?;
            request = request.bearer_auth(token.trim());
        }

        let response = request
            .send()
            .await
            .map_err(|error| ReviewError::Unavailable(error.without_url().to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(ReviewError::Unavailable(format!(
                "TokenReview answered HTTP {}",
                status.as_u16()
            )));
        }
        let review: Value = response
            .json()
            .await
            .map_err(|error| ReviewError::Unavailable(error.without_url().to_string()))?;

        let status = &review["status"];
        if status["authenticated"] != Value::Bool(true) {
            return Err(ReviewError::Rejected);
        }
        let username = status["user"]["username"].as_str().unwrap_or_default();
        let Some((namespace, name)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(ReviewError::Rejected);
        };
        let granted: Vec<String> = status["audiences"]
            .as_array()
            .map(|values| {
                values
                    .iter()
                    .filter_map(|value| value.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            audiences: granted,
        })
    }
}

impl KubernetesRole {
    /// Whether this role admits the reviewed service account.
    pub fn admits(&self, account: &ServiceAccount) -> bool {
        let listed = |allowed: &[String], value: &str| {
            allowed.iter().any(|entry| entry == "*" || entry == value)
        };
        let audience_ok = self.audiences.is_empty()
            || account
                .audiences
                .iter()
                .any(|audience| self.audiences.contains(audience));
        listed(&self.namespaces, &account.namespace)
            && listed(&self.service_accounts, &account.name)
            && audience_ok
    }
}
