//! Parser for access logs in the Apache/nginx combined format:
//! `host ident user [time] "request" status size "referer" "user-agent"`.
//!
//! Lines without the referer and user-agent fields (the Common Log Format) are accepted too.
//! A malformed line is an error naming its line number and the reason; [`AccessLogReader`]
//! reports such lines and goes on with the next one.

mod timestamp;

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

pub use timestamp::LogTime;

/// One request from an access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    /// Line number in the file, starting at 1.
    pub line: usize,
    /// Client address (`%h`), as written: an IP address or a host name.
    pub client: String,
    /// Time the request was received (`%t`).
    pub time: LogTime,
    /// HTTP method, such as `GET`.
    pub method: String,
    /// Request target, such as `/videos/42/manifest.m3u8?quality=hd`.
    pub path: String,
    /// Protocol of the request line, such as `HTTP/1.1`; absent in HTTP/0.9-style lines.
    pub protocol: Option<String>,
    /// Response status code (`%>s`).
    pub status: u16,
    /// Response size in bytes (`%b`); `None` when the log wrote `-`.
    pub size: Option<u64>,
    /// `Referer` header; `None` when the log wrote `-` or has no such field.
    pub referer: Option<String>,
    /// `User-Agent` header; `None` when the log wrote `-` or has no such field.
    pub user_agent: Option<String>,
}

/// A line that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct MalformedLine {
    /// Line number in the file, starting at 1.
    pub line: usize,
    /// Description of the problem.
    pub reason: String,
}

/// Errors from reading an access log file.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The file could not be opened or read.
    #[error("failed to read access log {path}: {source}")]
    Read {
        /// The log file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
}

/// The well-formed entries of a log plus the lines that were skipped.
#[derive(Debug, Clone, Default)]
pub struct ParsedAccessLog {
    /// Entries in file order.
    pub entries: Vec<AccessLogEntry>,
    /// Malformed lines, in file order.
    pub malformed: Vec<MalformedLine>,
}

/// Reads a whole access log file, collecting malformed lines instead of stopping at them.
///
/// # Errors
/// Returns [`AccessLogError::Read`] when the file cannot be opened or read.
pub fn read_access_log(path: &Path) -> Result<ParsedAccessLog, AccessLogError> {
    let read_error = |source| AccessLogError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;

    let mut parsed = ParsedAccessLog::default();
    for item in AccessLogReader::new(BufReader::new(file)) {
        match item.map_err(read_error)? {
            Ok(entry) => parsed.entries.push(entry),
            Err(malformed) => parsed.malformed.push(malformed),
        }
    }
    Ok(parsed)
}

/// Iterator over the lines of a log: an entry or a [`MalformedLine`] per non-blank line.
///
/// The outer `Result` carries I/O errors, after which the iterator ends. Blank lines are
/// skipped without a report; bytes that are not UTF-8 make the line malformed.
pub struct AccessLogReader<R> {
    input: R,
    line: usize,
    buffer: Vec<u8>,
    failed: bool,
}

impl<R: BufRead> AccessLogReader<R> {
    /// Wraps a buffered reader positioned at the start of a log.
    pub fn new(input: R) -> Self {
        AccessLogReader {
            input,
            line: 0,
            buffer: Vec::new(),
            failed: false,
        }
    }
}

impl<R: BufRead> Iterator for AccessLogReader<R> {
    type Item = io::Result<Result<AccessLogEntry, MalformedLine>>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.failed {
            self.buffer.clear();
            match self.input.read_until(b'\n', &mut self.buffer) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(error) => {
                    self.failed = true;
                    return Some(Err(error));
                }
            }
            self.line += 1;

            let Ok(text) = std::str::from_utf8(&self.buffer) else {
                return Some(Ok(Err(MalformedLine {
                    line: self.line,
                    reason: "line is not valid UTF-8".to_string(),
                })));
            };
            let text = text.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            return Some(Ok(parse_line(self.line, text)));
        }
        None
    }
}

/// Parses one combined-format line; `line` is its number, used in the result and the error.
///
/// # Errors
/// Returns [`MalformedLine`] naming the first field that is missing or invalid.
pub fn parse_line(line: usize, text: &str) -> Result<AccessLogEntry, MalformedLine> {
    parse_fields(line, text).map_err(|reason| MalformedLine { line, reason })
}

fn parse_fields(line: usize, text: &str) -> Result<AccessLogEntry, String> {
    let mut cursor = Cursor { rest: text };
    let client = cursor.word("client address")?.to_string();
    cursor.word("ident")?;
    cursor.word("user")?;
    let time = LogTime::parse(cursor.bracketed("timestamp")?)?;
    let request = cursor.quoted("request line")?;
    let status = parse_status(cursor.word("status")?)?;
    let size = parse_size(cursor.word("size")?)?;

    let (referer, user_agent) = if cursor.is_at_end() {
        (None, None)
    } else {
        let referer = dash_to_none(cursor.quoted("referer")?);
        let user_agent = dash_to_none(cursor.quoted("user agent")?);
        (referer, user_agent)
    };
    // nginx and Apache may append custom fields after the user agent; they are ignored.

    let (method, path, protocol) = parse_request_line(&request)?;
    Ok(AccessLogEntry {
        line,
        client,
        time,
        method,
        path,
        protocol,
        status,
        size,
        referer,
        user_agent,
    })
}

fn parse_request_line(request: &str) -> Result<(String, String, Option<String>), String> {
    let mut parts = request.split(' ').filter(|part| !part.is_empty());
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(format!(
            "invalid request line {request:?}, expected \"METHOD /path HTTP/x.y\""
        ));
    };
    let protocol = parts.next();
    if parts.next().is_some() {
        return Err(format!(
            "invalid request line {request:?}, expected \"METHOD /path HTTP/x.y\""
        ));
    }
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("invalid method {method:?} in request line"));
    }
    if !(path.starts_with('/') || path == "*" || path.contains("://")) {
        return Err(format!("invalid request target {path:?}"));
    }
    if let Some(protocol) = protocol
        && !protocol.starts_with("HTTP/")
    {
        return Err(format!("invalid protocol {protocol:?} in request line"));
    }
    Ok((
        method.to_string(),
        path.to_string(),
        protocol.map(str::to_string),
    ))
}

fn parse_status(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(status) if (100..=599).contains(&status) && text.len() == 3 => Ok(status),
        _ => Err(format!("invalid status {text:?}, expected 100 to 599")),
    }
}

fn parse_size(text: &str) -> Result<Option<u64>, String> {
    if text == "-" {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| format!("invalid size {text:?}, expected bytes or -"))
}

fn dash_to_none(text: String) -> Option<String> {
    (text != "-").then_some(text)
}

/// Splits a line into its space-separated, bracketed and quoted fields.
struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    fn is_at_end(&self) -> bool {
        self.rest.trim_start().is_empty()
    }

    fn word(&mut self, field: &str) -> Result<&'a str, String> {
        let rest = self.rest.trim_start_matches(' ');
        let end = rest.find(' ').unwrap_or(rest.len());
        if end == 0 {
            return Err(format!("missing field {field}"));
        }
        self.rest = &rest[end..];
        Ok(&rest[..end])
    }

    fn bracketed(&mut self, field: &str) -> Result<&'a str, String> {
        let rest = self.rest.trim_start_matches(' ');
        let inner = rest
            .strip_prefix('[')
            .ok_or_else(|| format!("missing field {field}, expected [...]"))?;
        let end = inner
            .find(']')
            .ok_or_else(|| format!("unterminated field {field}, missing ]"))?;
        self.rest = &inner[end + 1..];
        Ok(&inner[..end])
    }

    /// Reads a double-quoted field; `\"` and `\\` inside it are unescaped.
    fn quoted(&mut self, field: &str) -> Result<String, String> {
        let rest = self.rest.trim_start_matches(' ');
        let inner = rest
            .strip_prefix('"')
            .ok_or_else(|| format!("missing field {field}, expected a quoted string"))?;

        let mut value = String::new();
        let mut chars = inner.char_indices();
        while let Some((index, c)) = chars.next() {
            match c {
                '"' => {
                    self.rest = &inner[index + 1..];
                    return Ok(value);
                }
                '\\' => match chars.next() {
                    Some((_, escaped @ ('"' | '\\'))) => value.push(escaped),
                    Some((_, other)) => {
                        value.push('\\');
                        value.push(other);
                    }
                    None => break,
                },
                _ => value.push(c),
            }
        }
        Err(format!("unterminated field {field}, missing closing quote"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMBINED: &str = r#"100.90.71.123 - - [17/May/2015:10:05:03 +0000] "GET /presentations/kibana-search.png HTTP/1.1" 200 203023 "-" "Mozilla/5.0 (Macintosh) Chrome/32.0""#;

    #[test]
    fn parses_combined_line() {
        let entry = parse_line(7, COMBINED).unwrap();
        assert_eq!(entry.line, 7);
        assert_eq!(entry.client, "100.90.71.123");
        assert_eq!(
            entry.time,
            LogTime::parse("17/May/2015:10:05:03 +0000").unwrap()
        );
        assert_eq!(entry.method, "GET");
        assert_eq!(entry.path, "/presentations/kibana-search.png");
        assert_eq!(entry.protocol.as_deref(), Some("HTTP/1.1"));
        assert_eq!(entry.status, 200);
        assert_eq!(entry.size, Some(203_023));
        assert_eq!(entry.referer, None);
        assert_eq!(
            entry.user_agent.as_deref(),
            Some("Mozilla/5.0 (Macintosh) Chrome/32.0")
        );
    }

    #[test]
    fn parses_dash_size_and_referer() {
        let text = r#"10.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "HEAD /robots.txt HTTP/1.0" 304 - "http://example.com/start" "curl/8.0""#;
        let entry = parse_line(1, text).unwrap();
        assert_eq!(entry.method, "HEAD");
        assert_eq!(entry.size, None);
        assert_eq!(entry.referer.as_deref(), Some("http://example.com/start"));
        assert_eq!(entry.time.offset_seconds, -25_200);
    }

    #[test]
    fn parses_common_log_format_line() {
        let text = r#"::1 - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1" 200 12"#;
        let entry = parse_line(1, text).unwrap();
        assert_eq!(entry.client, "::1");
        assert_eq!(entry.user_agent, None);
        assert_eq!(entry.referer, None);
    }

    #[test]
    fn unescapes_quotes_inside_fields() {
        let text = r#"1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1" 200 1 "-" "agent \"quoted\" \x22hex""#;
        let entry = parse_line(1, text).unwrap();
        assert_eq!(
            entry.user_agent.as_deref(),
            Some(r#"agent "quoted" \x22hex"#)
        );
    }

    #[test]
    fn rejects_user_agent_without_closing_quote() {
        // A log writer that cut the line at a buffer limit leaves the last quote open.
        let text = r#"100.127.3.9 - - [20/May/2015:12:05:17 +0000] "GET /scripts/grok-py-test/configlib.py HTTP/1.1" 200 235 "-" "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html"#;
        let error = parse_line(8_898, text).unwrap_err();
        assert_eq!(error.line, 8_898);
        assert_eq!(
            error.reason,
            "unterminated field user agent, missing closing quote"
        );
        assert!(error.to_string().starts_with("line 8898: "));
    }

    #[test]
    fn rejects_malformed_fields() {
        let cases = [
            ("", "missing field client address"),
            ("1.2.3.4 - -", "missing field timestamp"),
            (
                r#"1.2.3.4 - - [bad] "GET / HTTP/1.1" 200 1"#,
                "invalid timestamp",
            ),
            (
                r#"1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] GET / 200 1"#,
                "missing field request line",
            ),
            (
                r#"1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET / HTTP/1.1" 2000 1"#,
                "invalid status",
            ),
            (
                r#"1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET / HTTP/1.1" 200 big"#,
                "invalid size",
            ),
            (
                r#"1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET / HTTP/1.1" 200"#,
                "missing field size",
            ),
            (
                r#"1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "-" 400 0"#,
                "invalid request line",
            ),
            (
                r#"1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "get / HTTP/1.1" 200 0"#,
                "invalid method",
            ),
            (
                r#"1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET nowhere HTTP/1.1" 200 0"#,
                "invalid request target",
            ),
            (
                r#"1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET / HTTP/1.1" 200 0 "-""#,
                "missing field user agent",
            ),
        ];
        for (text, reason) in cases {
            let error = parse_line(3, text).unwrap_err();
            assert!(
                error.reason.starts_with(reason),
                "{text:?}: got {:?}, expected {reason:?}",
                error.reason
            );
        }
    }

    #[test]
    fn reader_reports_malformed_lines_and_continues() {
        let log = format!("{COMBINED}\n\nnot a log line\n{COMBINED}\r\n?\n");
        let mut input = log.into_bytes();
        // Replace the placeholder with a byte that is not UTF-8.
        let last = input.len() - 2;
        input[last] = 0xff;
        let items: Vec<_> = AccessLogReader::new(&input[..])
            .map(|item| item.unwrap())
            .collect();

        assert_eq!(items.len(), 4);
        assert_eq!(items[0].as_ref().unwrap().line, 1);
        assert_eq!(items[1].as_ref().unwrap_err().line, 3);
        assert_eq!(items[2].as_ref().unwrap().line, 4);
        assert_eq!(
            items[2].as_ref().unwrap().user_agent.as_deref(),
            Some("Mozilla/5.0 (Macintosh) Chrome/32.0")
        );
        assert_eq!(
            items[3].as_ref().unwrap_err(),
            &MalformedLine {
                line: 5,
                reason: "line is not valid UTF-8".to_string()
            }
        );
    }

    #[test]
    fn reads_shared_log_when_present() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/access-log-2015.log");
        if !path.exists() {
            return;
        }
        let parsed = read_access_log(&path).unwrap();
        assert_eq!(parsed.entries.len(), 9_999);
        assert_eq!(parsed.malformed.len(), 1);
        // Line numbers start at 1, as in editors and `grep -n`.
        assert_eq!(parsed.malformed[0].line, 8_899);
        assert!(parsed.malformed[0].reason.contains("user agent"));
    }

    #[test]
    fn read_names_missing_file() {
        let error = read_access_log(Path::new("/nonexistent/access.log")).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/access.log"));
    }
}
