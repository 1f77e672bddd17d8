//! Policy decisions pinned in a table: globs, deny precedence, capability separation, and
//! paths that try to escape their grant.

use custos_core::policy::{evaluate, Capability, Decision, Policy, Rule};
use custos_core::SecretPath;

fn policy(name: &str, rules: &[(&str, &[&str])]) -> Policy {
    let rules = rules
        .iter()
        .map(|(pattern, capabilities)| Rule::new(pattern, capabilities).unwrap())
        .collect();
    Policy::new(name, rules).unwrap()
}

fn policies() -> Vec<Policy> {
    vec![
        policy(
            "app",
            &[
                ("secret/app/*", &["read"]),
                ("secret/app", &["list"]),
                ("secret/app/config/**", &["read", "list", "write"]),
                ("secret/shared/db-*", &["read"]),
                ("secret/app/private", &["deny"]),
            ],
        ),
        policy(
            "ops",
            &[
                ("secret/**", &["list"]),
                ("secret/app/private", &["read"]),
                ("secret/team-*/keys/**", &["read", "delete"]),
                ("sys/audit", &["audit"]),
            ],
        ),
    ]
}

const ALLOW: &str = "allow";
const DEFAULT: &str = "default-deny";
const EXPLICIT: &str = "explicit-deny";

#[test]
fn decisions_match_the_table() {
    #[rustfmt::skip]
    let table: &[(&str, Capability, &str)] = &[
        // One-segment `*`: exactly one level below.
        ("secret/app/db",               Capability::Read,   ALLOW),
        ("secret/app/db/nested",        Capability::Read,   DEFAULT),
        ("secret/app",                  Capability::Read,   DEFAULT),
        ("secret/appx",                 Capability::Read,   DEFAULT),
        ("secret/ap",                   Capability::Read,   DEFAULT),
        // `**`: the folder itself and any depth below.
        ("secret/app/config",           Capability::Write,  ALLOW),
        ("secret/app/config/a/b/c",     Capability::Write,  ALLOW),
        ("secret/app/configuration",    Capability::Write,  DEFAULT),
        // In-segment globs.
        ("secret/shared/db-main",       Capability::Read,   ALLOW),
        ("secret/shared/db-",           Capability::Read,   ALLOW),
        ("secret/shared/xdb-main",      Capability::Read,   DEFAULT),
        ("secret/team-a/keys/k1",       Capability::Delete, ALLOW),
        ("secret/team-b/keys/x/y",      Capability::Read,   ALLOW),
        ("secret/team/keys/k1",         Capability::Read,   DEFAULT),
        // Capabilities are separate: read does not imply list, write or delete.
        ("secret/app/db",               Capability::List,   ALLOW), // from ops: secret/**
        ("secret/app/db",               Capability::Write,  DEFAULT),
        ("secret/app/db",               Capability::Delete, DEFAULT),
        ("secret/app",                  Capability::List,   ALLOW),
        ("secret/shared/db-main",       Capability::Write,  DEFAULT),
        ("other/app/db",                Capability::Read,   DEFAULT),
        // An explicit deny wins over grants in any policy, for every capability.
        ("secret/app/private",          Capability::Read,   EXPLICIT),
        ("secret/app/private",          Capability::List,   EXPLICIT),
        // Deny covers only what its pattern matches.
        ("secret/app/private2",         Capability::Read,   ALLOW),
        // Audit and admin are capabilities of their own.
        ("sys/audit",                   Capability::Audit,  ALLOW),
        ("sys/audit",                   Capability::Read,   DEFAULT),
        ("sys/policies",                Capability::Admin,  DEFAULT),
    ];

    let policies = policies();
    for (path, capability, expected) in table {
        let decision = evaluate(&policies, &SecretPath::parse(path).unwrap(), *capability);
        let actual = match decision {
            Decision::Allow => ALLOW,
            Decision::DefaultDeny => DEFAULT,
            Decision::ExplicitDeny { .. } => EXPLICIT,
        };
        assert_eq!(actual, *expected, "{capability} on {path}");
    }
}

#[test]
fn odd_spellings_normalise_before_evaluation_or_are_refused() {
    let policies = policies();
    // Spellings that normalise to a granted path are that path.
    for spelling in ["/secret/app/db/", "secret/app/d%62"] {
        let path = SecretPath::parse(spelling).unwrap();
        assert!(
            evaluate(&policies, &path, Capability::Read).is_allowed(),
            "{spelling}"
        );
    }
    // Spellings that would climb out of a grant never become a path to evaluate.
    for escape in [
        "secret/app/../private",
        "secret/app/%2e%2e/private",
        "secret/app/db%2f..%2f..%2fother",
        "secret/app//db",
        "secret/app/db\0",
    ] {
        assert!(SecretPath::parse(escape).is_err(), "{escape}");
    }
    // And a deny cannot be dodged by a spelling that still normalises to the path.
    let private = SecretPath::parse("secret/app/privat%65").unwrap();
    assert!(!evaluate(&policies, &private, Capability::Read).is_allowed());
}

#[test]
fn no_policies_means_no_access() {
    let path = SecretPath::parse("secret/app/db").unwrap();
    assert_eq!(
        evaluate(&[], &path, Capability::Read),
        Decision::DefaultDeny
    );
}

#[test]
fn malformed_rules_are_refused_with_a_reason() {
    assert!(Rule::new("secret/a**", &["read"]).is_err());
    assert!(Rule::new("secret/../x", &["read"]).is_err());
    assert!(Rule::new("", &["read"]).is_err());
    assert!(Rule::new("secret/*", &["reed"])
        .unwrap_err()
        .to_string()
        .contains("reed"));
    assert!(Rule::new("secret/*", &[]).is_err());
    assert!(Policy::new("bad name", vec![]).is_err());
}
