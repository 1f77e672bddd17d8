//! Secret paths: the one place where untrusted path text becomes a normalised path.
//!
//! A path is a list of segments separated by `/`, such as `secret/team-a/db`. Every other
//! part of Custos (routing, storage keys, audit records, later policies) works on the
//! [`SecretPath`] produced here and never re-parses text, so traversal tricks have exactly
//! one place to be stopped.
//!
//! Rules, applied after percent-decoding each segment on its own:
//! - segments are non-empty and made only of ASCII letters, digits and `-_.@+=,~:`;
//! - `.` and `..` are refused, whether written plainly or percent-encoded;
//! - a percent-encoded `/` or `\` is refused (it would smuggle a separator into a segment),
//!   and so is a `%` that survives decoding (double encoding);
//! - at most [`MAX_PATH_BYTES`] bytes in all, [`MAX_SEGMENT_BYTES`] per segment and
//!   [`MAX_SEGMENTS`] segments.
//!
//! One leading or trailing `/` is tolerated (`/secret/a/` is `secret/a`) because clients
//! build URLs by concatenation; doubled slashes inside a path are empty segments and refused.

use std::fmt;

use percent_encoding::percent_decode_str;

/// Longest accepted path, counted after decoding, separators included.
pub const MAX_PATH_BYTES: usize = 512;

/// Longest accepted segment, after decoding.
pub const MAX_SEGMENT_BYTES: usize = 128;

/// Deepest accepted path.
pub const MAX_SEGMENTS: usize = 32;

/// Why a path was refused. The messages are written for the person who typed the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is empty; give a path such as `secret/app/db`")]
    Empty,

    #[error("the path is {length} bytes long; the limit is {MAX_PATH_BYTES}")]
    TooLong { length: usize },

    #[error("the path has {count} segments; the limit is {MAX_SEGMENTS}")]
    TooDeep { count: usize },

    #[error("segment {position} is empty (a doubled `/`); remove the extra slash")]
    EmptySegment { position: usize },

    #[error("segment {position} is `.` or `..`; relative segments are not allowed in paths")]
    RelativeSegment { position: usize },

    #[error("segment {position} is {length} bytes long; the limit is {MAX_SEGMENT_BYTES}")]
    SegmentTooLong { position: usize, length: usize },

    #[error("segment {position} has invalid percent-encoding or is not UTF-8")]
    BadEncoding { position: usize },

    #[error(
        "segment {position} contains {character:?}; segments may use only ASCII letters, \
         digits and `-_.@+=,~:`"
    )]
    ForbiddenCharacter { position: usize, character: char },
}

/// A validated, normalised secret path: at least one segment, each one safe.
///
/// The text form is the segments joined with `/`; it is also the storage key, so two
/// spellings of one path (`/a/b/` and `a/b`, or `a%2Db` and `a-b`) name the same secret.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretPath {
    normalised: String,
}

impl SecretPath {
    /// Parses untrusted path text, percent-decoding each segment on its own.
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        let trimmed = raw.strip_prefix('/').unwrap_or(raw);
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        if trimmed.is_empty() {
            return Err(PathError::Empty);
        }

        let raw_segments: Vec<&str> = trimmed.split('/').collect();
        if raw_segments.len() > MAX_SEGMENTS {
            return Err(PathError::TooDeep {
                count: raw_segments.len(),
            });
        }

        let mut normalised = String::with_capacity(trimmed.len());
        for (index, raw_segment) in raw_segments.iter().enumerate() {
            let position = index + 1;
            let segment = decode_segment(raw_segment, position)?;
            validate_segment(&segment, position)?;

            if !normalised.is_empty() {
                normalised.push('/');
            }
            normalised.push_str(&segment);
        }

        if normalised.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong {
                length: normalised.len(),
            });
        }
        Ok(Self { normalised })
    }

    /// The normalised text form, segments joined by `/`.
    pub fn as_str(&self) -> &str {
        &self.normalised
    }

    /// The segments in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.normalised.split('/')
    }

    /// Number of segments.
    pub fn depth(&self) -> usize {
        self.segments().count()
    }

    /// True when `prefix` is this path or one of its ancestors, segment by segment
    /// (`a/b` is a prefix of `a/b/c` but not of `a/bc`).
    pub fn starts_with(&self, prefix: &SecretPath) -> bool {
        match self.normalised.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// The part of this path below `prefix`, or `None` when `prefix` is not an ancestor.
    /// Returns `Some(None)` when the path is the prefix itself.
    pub fn strip_prefix(&self, prefix: &SecretPath) -> Option<Option<SecretPath>> {
        if !self.starts_with(prefix) {
            return None;
        }
        let rest = &self.normalised[prefix.as_str().len()..];
        match rest.strip_prefix('/') {
            // Every segment of `rest` was already validated as part of `self`.
            Some(rest) => Some(Some(SecretPath {
                normalised: rest.to_owned(),
            })),
            None => Some(None),
        }
    }

    /// This path with `child` appended.
    pub fn join(&self, child: &SecretPath) -> Result<SecretPath, PathError> {
        let joined = format!("{}/{}", self.normalised, child.normalised);
        if joined.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong {
                length: joined.len(),
            });
        }
        if joined.split('/').count() > MAX_SEGMENTS {
            return Err(PathError::TooDeep {
                count: joined.split('/').count(),
            });
        }
        Ok(SecretPath { normalised: joined })
    }
}

impl fmt::Display for SecretPath {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.normalised)
    }
}

impl fmt::Debug for SecretPath {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "SecretPath({:?})", self.normalised)
    }
}

impl std::str::FromStr for SecretPath {
    type Err = PathError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        Self::parse(raw)
    }
}

fn decode_segment(raw_segment: &str, position: usize) -> Result<String, PathError> {
    if raw_segment.is_empty() {
        return Err(PathError::EmptySegment { position });
    }
    if !raw_segment.contains('%') {
        return Ok(raw_segment.to_owned());
    }

    // `percent_decode_str` leaves malformed escapes such as `%zz` as they are; the `%` that
    // remains is then refused by `validate_segment`, like any other double encoding.
    percent_decode_str(raw_segment)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| PathError::BadEncoding { position })
}

fn validate_segment(segment: &str, position: usize) -> Result<(), PathError> {
    if segment.is_empty() {
        return Err(PathError::EmptySegment { position });
    }
    if segment == "." || segment == ".." {
        return Err(PathError::RelativeSegment { position });
    }
    if segment.len() > MAX_SEGMENT_BYTES {
        return Err(PathError::SegmentTooLong {
            position,
            length: segment.len(),
        });
    }
    if let Some(character) = segment.chars().find(|character| !is_allowed(*character)) {
        return Err(PathError::ForbiddenCharacter {
            position,
            character,
        });
    }
    Ok(())
}

fn is_allowed(character: char) -> bool {
    character.is_ascii_alphanumeric() || "-_.@+=,~:".contains(character)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> String {
        SecretPath::parse(raw).unwrap().to_string()
    }

    #[test]
    fn normalises_leading_and_trailing_slashes_and_percent_encoding() {
        assert_eq!(parsed("secret/app/db"), "secret/app/db");
        assert_eq!(parsed("/secret/app/db/"), "secret/app/db");
        assert_eq!(parsed("secret/a%2Db"), "secret/a-b");
        assert_eq!(parsed("secret/v1.2"), "secret/v1.2");
        assert_eq!(parsed("secret/...hidden"), "secret/...hidden");
    }

    #[test]
    fn refuses_traversal_in_every_spelling() {
        let cases = [
            (
                "secret/../other",
                PathError::RelativeSegment { position: 2 },
            ),
            ("secret/./a", PathError::RelativeSegment { position: 2 }),
            (
                "secret/%2e%2e/other",
                PathError::RelativeSegment { position: 2 },
            ),
            ("secret/%2E/a", PathError::RelativeSegment { position: 2 }),
            ("secret/.%2e", PathError::RelativeSegment { position: 2 }),
            ("..", PathError::RelativeSegment { position: 1 }),
        ];
        for (raw, expected) in cases {
            assert_eq!(SecretPath::parse(raw), Err(expected), "{raw}");
        }
    }

    #[test]
    fn refuses_smuggled_separators_and_double_encoding() {
        let cases = [
            ("secret/a%2fb", '/'),
            ("secret/a%2Fb", '/'),
            ("secret/a%5cb", '\\'),
            ("secret/%252e%252e", '%'),
            ("secret/a%zz", '%'),
        ];
        for (raw, character) in cases {
            assert_eq!(
                SecretPath::parse(raw),
                Err(PathError::ForbiddenCharacter {
                    position: 2,
                    character
                }),
                "{raw}"
            );
        }
    }

    #[test]
    fn refuses_empty_segments_control_characters_and_oversize() {
        assert_eq!(SecretPath::parse(""), Err(PathError::Empty));
        assert_eq!(SecretPath::parse("/"), Err(PathError::Empty));
        assert_eq!(
            SecretPath::parse("secret//a"),
            Err(PathError::EmptySegment { position: 2 })
        );
        assert!(matches!(
            SecretPath::parse("secret/a\nb"),
            Err(PathError::ForbiddenCharacter {
                character: '\n',
                ..
            })
        ));
        assert!(matches!(
            SecretPath::parse("secret/a%00b"),
            Err(PathError::ForbiddenCharacter {
                character: '\0',
                ..
            })
        ));
        assert!(matches!(
            SecretPath::parse("secret/caf%C3%A9"),
            Err(PathError::ForbiddenCharacter {
                character: 'é', ..
            })
        ));
        assert!(matches!(
            SecretPath::parse("secret/%ff"),
            Err(PathError::BadEncoding { position: 2 })
        ));

        let long_segment = "a".repeat(MAX_SEGMENT_BYTES + 1);
        assert!(matches!(
            SecretPath::parse(&format!("secret/{long_segment}")),
            Err(PathError::SegmentTooLong { position: 2, .. })
        ));
        let deep = vec!["a"; MAX_SEGMENTS + 1].join("/");
        assert!(matches!(
            SecretPath::parse(&deep),
            Err(PathError::TooDeep { .. })
        ));
        let long = vec!["a".repeat(100); 6].join("/");
        assert!(matches!(
            SecretPath::parse(&long),
            Err(PathError::TooLong { .. })
        ));
    }

    #[test]
    fn prefixes_compare_whole_segments() {
        let path = SecretPath::parse("a/bc/d").unwrap();
        assert!(path.starts_with(&SecretPath::parse("a/bc").unwrap()));
        assert!(!path.starts_with(&SecretPath::parse("a/b").unwrap()));
        assert_eq!(
            path.strip_prefix(&SecretPath::parse("a").unwrap()),
            Some(Some(SecretPath::parse("bc/d").unwrap()))
        );
        assert_eq!(path.strip_prefix(&path), Some(None));
    }
}
