//! Policies: who may do what on which paths, decided by one pure function.
//!
//! A policy is a named list of rules; a rule grants capabilities on a path pattern. A
//! pattern is a normalised path whose segments may be:
//! - a literal segment (`db`);
//! - a segment glob with `*` standing for any run of characters inside the segment
//!   (`*` alone is any one segment, `db-*` any segment starting with `db-`);
//! - `**`, any number of segments, none included (`secret/app/**` matches `secret/app`,
//!   `secret/app/db` and `secret/app/a/b`).
//!
//! Evaluation denies by default, and an explicit `deny` on a matching rule wins over
//! every grant, in any policy the token holds.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use crate::path::{PathError, SecretPath};

/// What a rule can grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    Read,
    List,
    Write,
    Delete,
    /// Search the audit log (checked on `sys/audit`).
    Audit,
    /// Manage policies, tokens, roles and others' leases (checked on `sys/...`).
    Admin,
    /// Refuse everything on the matching paths, whatever other rules grant.
    Deny,
}

impl Capability {
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Read => "read",
            Capability::List => "list",
            Capability::Write => "write",
            Capability::Delete => "delete",
            Capability::Audit => "audit",
            Capability::Admin => "admin",
            Capability::Deny => "deny",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl FromStr for Capability {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "read" => Capability::Read,
            "list" => Capability::List,
            "write" => Capability::Write,
            "delete" => Capability::Delete,
            "audit" => Capability::Audit,
            "admin" => Capability::Admin,
            "deny" => Capability::Deny,
            other => return Err(PolicyError::UnknownCapability(other.to_owned())),
        })
    }
}

/// Why a policy could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown capability `{0}`; use read, list, write, delete, audit, admin or deny")]
    UnknownCapability(String),

    #[error("pattern `{pattern}`: {reason}")]
    BadPattern { pattern: String, reason: String },

    #[error("a rule needs at least one capability")]
    NoCapabilities,

    #[error("policy name `{0}` is invalid; use 1 to 64 ASCII letters, digits, `-` and `_`")]
    BadName(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternSegment {
    Literal(String),
    /// A segment with `*` wildcards, split at them: `db-*-x` is `["db-", "-x"]`.
    Glob(Vec<String>),
    AnyDepth,
}

/// A path pattern such as `secret/app/*` or `secret/**`.
#[derive(Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<PatternSegment>,
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let bad = |reason: &str| PolicyError::BadPattern {
            pattern: text.to_owned(),
            reason: reason.to_owned(),
        };
        let trimmed = text.trim_matches('/');
        if trimmed.is_empty() {
            return Err(bad("the pattern is empty; use `**` for everything"));
        }

        let mut segments = Vec::new();
        for segment in trimmed.split('/') {
            let parsed = if segment == "**" {
                PatternSegment::AnyDepth
            } else if segment.contains("**") {
                return Err(bad("`**` must be a whole segment"));
            } else if segment.contains('*') {
                // The literal pieces must be valid path text on their own.
                for piece in segment.split('*').filter(|piece| !piece.is_empty()) {
                    check_literal(piece).map_err(|error| bad(&error.to_string()))?;
                }
                PatternSegment::Glob(segment.split('*').map(str::to_owned).collect())
            } else {
                check_literal(segment).map_err(|error| bad(&error.to_string()))?;
                PatternSegment::Literal(segment.to_owned())
            };
            segments.push(parsed);
        }
        Ok(Self {
            text: trimmed.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `path` matches the whole pattern.
    pub fn matches(&self, path: &SecretPath) -> bool {
        let segments: Vec<&str> = path.segments().collect();
        matches_from(&self.segments, &segments)
    }
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "PathPattern({:?})", self.text)
    }
}

fn check_literal(text: &str) -> Result<(), PathError> {
    let parsed = SecretPath::parse(text)?;
    if parsed.as_str() != text {
        return Err(PathError::ForbiddenCharacter {
            position: 1,
            character: '%',
        });
    }
    Ok(())
}

fn matches_from(pattern: &[PatternSegment], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((PatternSegment::AnyDepth, rest)) => {
            (0..=path.len()).any(|skipped| matches_from(rest, &path[skipped..]))
        }
        Some((segment, rest)) => match path.split_first() {
            Some((first, remaining)) => {
                segment_matches(segment, first) && matches_from(rest, remaining)
            }
            None => false,
        },
    }
}

fn segment_matches(pattern: &PatternSegment, segment: &str) -> bool {
    match pattern {
        PatternSegment::Literal(literal) => literal == segment,
        PatternSegment::AnyDepth => true,
        PatternSegment::Glob(pieces) => glob_matches(pieces, segment),
    }
}

/// `pieces` are the parts between `*`s: the first must start the text, the last must end
/// it, and the middle ones must appear in order.
fn glob_matches(pieces: &[String], text: &str) -> bool {
    let (Some(first), Some(last)) = (pieces.first(), pieces.last()) else {
        return true;
    };
    if pieces.len() == 1 {
        return text == first;
    }
    if !text.starts_with(first.as_str()) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    if !text.ends_with(last.as_str()) {
        return false;
    }
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece.as_str()) {
            Some(position) => rest = &rest[position + piece.len()..],
            None => return false,
        }
    }
    true
}

/// One rule: capabilities granted (or denied) on a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pattern: PathPattern,
    pub capabilities: BTreeSet<Capability>,
}

impl Rule {
    pub fn new(pattern: &str, capabilities: &[&str]) -> Result<Self, PolicyError> {
        let capabilities = capabilities
            .iter()
            .map(|capability| capability.parse())
            .collect::<Result<BTreeSet<Capability>, _>>()?;
        if capabilities.is_empty() {
            return Err(PolicyError::NoCapabilities);
        }
        Ok(Self {
            pattern: PathPattern::parse(pattern)?,
            capabilities,
        })
    }
}

/// A named set of rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn new(name: &str, rules: Vec<Rule>) -> Result<Self, PolicyError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|character| character.is_ascii_alphanumeric() || "-_".contains(character));
        if !valid {
            return Err(PolicyError::BadName(name.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            rules,
        })
    }
}

/// The answer to "may this be done?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// A matching rule of this policy says `deny`.
    ExplicitDeny {
        policy: String,
    },
    /// No rule grants the capability.
    DefaultDeny,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Decides whether `policies` allow `capability` on `path`.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    path: &SecretPath,
    capability: Capability,
) -> Decision {
    let mut allowed = false;
    for policy in policies {
        for rule in policy
            .rules
            .iter()
            .filter(|rule| rule.pattern.matches(path))
        {
            if rule.capabilities.contains(&Capability::Deny) {
                return Decision::ExplicitDeny {
                    policy: policy.name.clone(),
                };
            }
            allowed |= rule.capabilities.contains(&capability);
        }
    }
    if allowed {
        Decision::Allow
    } else {
        Decision::DefaultDeny
    }
}
