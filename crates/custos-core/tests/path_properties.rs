//! Property tests: whatever text a client sends, an accepted path never escapes its mount.

use std::sync::Arc;

use async_trait::async_trait;
use custos_core::{
    BackendError, DeleteRequest, ListEntry, Mount, MountTable, Operation, SecretBackend,
    SecretData, SecretPath, SecretVersion, VersionMetadata, WriteOptions,
};
use proptest::prelude::*;

/// A backend that is never called: routing only needs something to point at.
#[derive(Debug)]
struct Unreachable;

#[async_trait]
impl SecretBackend for Unreachable {
    fn kind(&self) -> &'static str {
        "unreachable"
    }

    fn supports(&self, _operation: Operation) -> bool {
        false
    }

    async fn read(&self, _: &SecretPath, _: Option<u64>) -> Result<SecretVersion, BackendError> {
        Err(BackendError::NotFound)
    }

    async fn list(&self, _: Option<&SecretPath>) -> Result<Vec<ListEntry>, BackendError> {
        Err(BackendError::NotFound)
    }

    async fn write(
        &self,
        _: &SecretPath,
        _: SecretData,
        _: WriteOptions,
    ) -> Result<VersionMetadata, BackendError> {
        Err(BackendError::NotFound)
    }

    async fn delete(&self, _: &SecretPath, _: DeleteRequest) -> Result<(), BackendError> {
        Err(BackendError::NotFound)
    }
}

fn table() -> MountTable {
    let mount = |path: &str| Mount {
        path: SecretPath::parse(path).unwrap(),
        backend: Arc::new(Unreachable),
        read_only: false,
        lease: custos_core::LeaseLimits::default(),
    };
    MountTable::new(vec![
        mount("team-a"),
        mount("team-a/private"),
        mount("team-b"),
    ])
    .unwrap()
}

/// Path-like text built from pieces attackers like: dots, slashes, encodings, controls.
fn hostile_suffix() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("/".to_owned()),
        Just("//".to_owned()),
        Just("%2e".to_owned()),
        Just("%2E%2e".to_owned()),
        Just("%2f".to_owned()),
        Just("%5c".to_owned()),
        Just("%25".to_owned()),
        Just("\\".to_owned()),
        Just("\0".to_owned()),
        Just("team-b".to_owned()),
        Just("private".to_owned()),
        "[a-z0-9_.-]{1,6}",
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn accepted_paths_stay_under_the_mount_they_name(suffix in hostile_suffix()) {
        let raw = format!("team-a/{suffix}");
        let Ok(path) = SecretPath::parse(&raw) else {
            return Ok(());
        };

        let table = table();
        let (mount, relative) = table.route(&path).expect("every team-a path has a mount");
        prop_assert!(mount.path.as_str().starts_with("team-a"));
        prop_assert!(path.starts_with(&mount.path));

        for segment in path.segments() {
            prop_assert!(segment != "." && segment != "..");
            prop_assert!(!segment.is_empty());
            prop_assert!(!segment.contains(['/', '\\', '%', '\0']));
        }

        if let Some(relative) = relative {
            prop_assert_eq!(mount.path.join(&relative).unwrap(), path.clone());
        }
    }

    #[test]
    fn parsing_is_idempotent(raw in "\\PC{0,80}") {
        if let Ok(path) = SecretPath::parse(&raw) {
            prop_assert_eq!(SecretPath::parse(path.as_str()), Ok(path.clone()));
        }
    }
}
