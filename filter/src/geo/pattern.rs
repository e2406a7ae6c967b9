//! Asset path patterns such as `/videos/{asset}/`: a literal prefix that
//! ends with `/`, one `{asset}` path segment, and a literal suffix that is
//! empty or starts with `/`. A pattern matches the start of the path, so
//! `/live/{asset}` also matches `/live/a1/index.m3u8`. Patterns are parsed
//! once at configuration load and matched on the path's bytes.

use std::borrow::Cow;

use percent_encoding::percent_decode;

/// The placeholder of the asset segment in a pattern.
pub const ASSET_PLACEHOLDER: &str = "{asset}";

/// One parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetPattern {
    /// Literal text before the asset segment; starts and ends with `/`.
    prefix: String,
    /// Literal text after the asset segment; empty or starts with `/`.
    suffix: String,
}

impl AssetPattern {
    /// Parses a pattern. The error names the problem and how to write the
    /// pattern.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let Some((prefix, suffix)) = text.split_once(ASSET_PLACEHOLDER) else {
            return Err("a pattern contains `{asset}` once, such as \"/videos/{asset}/\"");
        };
        if suffix.contains(ASSET_PLACEHOLDER) {
            return Err("a pattern contains `{asset}` only once");
        }
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            return Err("a pattern starts with `/` and `{asset}` follows a `/`, \
                        such as \"/videos/{asset}/\"");
        }
        if !suffix.is_empty() && !suffix.starts_with('/') {
            return Err("`{asset}` is a whole path segment, so a `/` or the end follows it");
        }
        let literal_ok = |part: &str| {
            part.bytes().all(|byte| {
                byte.is_ascii_graphic() && !matches!(byte, b'?' | b'#' | b'{' | b'}' | b'%')
            })
        };
        if !literal_ok(prefix) || !literal_ok(suffix) {
            return Err(
                "besides `{asset}`, a pattern contains only path characters: \
                        no `?`, `#`, `%`, braces, spaces or control characters",
            );
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
        })
    }

    /// Returns the asset segment of `path` (without query string) when
    /// this pattern matches its start.
    pub fn segment<'p>(&self, path: &'p [u8]) -> Option<&'p [u8]> {
        let rest = path.strip_prefix(self.prefix.as_bytes())?;
        let end = rest
            .iter()
            .position(|&byte| byte == b'/')
            .unwrap_or(rest.len());
        let (segment, after) = rest.split_at(end);
        if segment.is_empty() || !after.starts_with(self.suffix.as_bytes()) {
            return None;
        }
        Some(segment)
    }
}

/// Returns `path` up to its query string or fragment.
pub fn without_query(path: &[u8]) -> &[u8] {
    let end = path
        .iter()
        .position(|&byte| byte == b'?' || byte == b'#')
        .unwrap_or(path.len());
    path.split_at(end).0
}

/// Returns the asset id of a path segment, percent-decoded. `None` when
/// the decoded id is not UTF-8, since no asset id can match it.
pub fn decode_asset(segment: &[u8]) -> Option<Cow<'_, str>> {
    if !segment.contains(&b'%') {
        return std::str::from_utf8(segment).ok().map(Cow::Borrowed);
    }
    percent_decode(segment).decode_utf8().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment<'p>(pattern: &str, path: &'p str) -> Option<&'p str> {
        let pattern = AssetPattern::parse(pattern).unwrap();
        let found = pattern.segment(without_query(path.as_bytes()))?;
        Some(std::str::from_utf8(found).unwrap())
    }

    #[test]
    fn pattern_matches_one_segment_at_path_start() {
        let cases = [
            ("/videos/{asset}/", "/videos/a1/seg-1.ts", Some("a1")),
            ("/videos/{asset}/", "/videos/a1/", Some("a1")),
            ("/videos/{asset}/", "/videos/a1", None),
            ("/videos/{asset}/", "/videos//x", None),
            ("/videos/{asset}/", "/other/videos/a1/", None),
            ("/live/{asset}", "/live/a1", Some("a1")),
            ("/live/{asset}", "/live/a1/index.m3u8", Some("a1")),
            ("/live/{asset}", "/live/a1?token=x/y", Some("a1")),
            ("/live/{asset}", "/live/", None),
            ("/v/{asset}/hls/", "/v/a1/hls/1.ts", Some("a1")),
            ("/v/{asset}/hls/", "/v/a1/dash/1.ts", None),
        ];
        for (pattern, path, expected) in cases {
            assert_eq!(segment(pattern, path), expected, "{pattern} on {path}");
        }
    }

    #[test]
    fn invalid_patterns_are_rejected() {
        for bad in [
            "/videos/",
            "/videos/{asset}/{asset}",
            "videos/{asset}/",
            "/videos{asset}/",
            "/videos/{asset}x",
            "/videos/{asset}?x",
            "/vid eos/{asset}",
            "/{id}/{asset}",
        ] {
            assert!(AssetPattern::parse(bad).is_err(), "{bad}");
        }
        assert!(AssetPattern::parse("/{asset}").is_ok());
    }

    #[test]
    fn percent_encoded_asset_is_decoded() {
        assert_eq!(decode_asset(b"a1").as_deref(), Some("a1"));
        assert_eq!(decode_asset(b"%61%31").as_deref(), Some("a1"));
        assert_eq!(decode_asset(b"a%2").as_deref(), Some("a%2"));
        assert_eq!(decode_asset(b"%ff"), None);
        assert_eq!(decode_asset(b"\xff"), None);
    }
}
