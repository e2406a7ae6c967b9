//! The decisions file: JSON Lines, one object per replayed request, such as
//! `{"t": 1.25, "customer": "cust-10.0.0.1", "tier": "basic", "status": 429, "latency_ms": 0.8}`.
//!
//! `t` is the time the request was sent, in seconds from the start of the replay. Readers
//! ignore fields they do not know, so writers may add more.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Status recorded when no HTTP response arrived (connection refused, timeout).
pub const NO_RESPONSE: u16 = 0;

/// One replayed request and the proxy's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Seconds from replay start to the moment the request was sent.
    pub t: f64,
    /// Customer id (the token's `sub`).
    pub customer: String,
    /// Tier claimed by the customer's token.
    pub tier: String,
    /// HTTP status of the response, or [`NO_RESPONSE`].
    pub status: u16,
    /// Milliseconds from sending the request to reading the whole response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Milliseconds the request was sent after its scheduled time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lateness_ms: Option<f64>,
    /// Line of the access log the request came from, for log replays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// Error that prevented a response, when `status` is [`NO_RESPONSE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Index of the proxy instance the request was sent to, for replays
    /// spread over several instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<usize>,
    /// `true` when the response carried the filter's `ratelimit` field and
    /// is not a 429: the filter admitted the request, whatever the upstream
    /// returned. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_admitted: Option<bool>,
}

impl Decision {
    /// Returns true for a request that counts against the customer's
    /// quota: a 2xx status, or any status of a request the filter admitted.
    pub fn is_admitted(&self) -> bool {
        (200..300).contains(&self.status) || self.filter_admitted == Some(true)
    }
}

/// Errors from reading or writing a decisions file.
#[derive(Debug, thiserror::Error)]
pub enum DecisionsError {
    /// The file could not be opened, read or written.
    #[error("failed to access decisions file {path}: {source}")]
    Io {
        /// The decisions file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// A line is not a decision object.
    #[error("invalid decision at {path}:{line}: {source}")]
    Parse {
        /// The decisions file.
        path: PathBuf,
        /// Line number, starting at 1.
        line: usize,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// Writes decisions as JSON Lines to any writer.
pub struct DecisionWriter<W: Write> {
    output: W,
}

impl<W: Write> DecisionWriter<W> {
    /// Wraps a writer; wrap files in a `BufWriter`.
    pub fn new(output: W) -> Self {
        DecisionWriter { output }
    }

    /// Appends one decision as a line.
    ///
    /// # Errors
    /// Returns the writer's I/O error.
    pub fn write(&mut self, decision: &Decision) -> io::Result<()> {
        serde_json::to_writer(&mut self.output, decision)?;
        self.output.write_all(b"\n")
    }

    /// Flushes and returns the writer.
    ///
    /// # Errors
    /// Returns the writer's I/O error.
    pub fn finish(mut self) -> io::Result<W> {
        self.output.flush()?;
        Ok(self.output)
    }
}

/// Writes all `decisions` to `path`, replacing the file.
///
/// # Errors
/// Returns [`DecisionsError::Io`] naming the file.
pub fn write_decisions(path: &Path, decisions: &[Decision]) -> Result<(), DecisionsError> {
    let io_error = |source| DecisionsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::create(path).map_err(io_error)?;
    let mut writer = DecisionWriter::new(BufWriter::new(file));
    for decision in decisions {
        writer.write(decision).map_err(io_error)?;
    }
    writer.finish().map_err(io_error)?;
    Ok(())
}

/// Reads a decisions file; blank lines are skipped.
///
/// # Errors
/// Returns [`DecisionsError::Io`], or [`DecisionsError::Parse`] with the line number.
pub fn read_decisions(path: &Path) -> Result<Vec<Decision>, DecisionsError> {
    let io_error = |source| DecisionsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;

    let mut decisions = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_error)?;
        if line.trim().is_empty() {
            continue;
        }
        let decision = serde_json::from_str(&line).map_err(|source| DecisionsError::Parse {
            path: path.to_path_buf(),
            line: index + 1,
            source,
        })?;
        decisions.push(decision);
    }
    Ok(decisions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Decision> {
        vec![
            Decision {
                t: 0.0,
                customer: "cust-10.0.0.1".to_string(),
                tier: "basic".to_string(),
                status: 200,
                latency_ms: Some(1.5),
                lateness_ms: Some(0.1),
                line: Some(1),
                error: None,
                instance: None,
                filter_admitted: None,
            },
            Decision {
                t: 0.25,
                customer: "cust-10.0.0.2".to_string(),
                tier: "pro".to_string(),
                status: NO_RESPONSE,
                latency_ms: None,
                lateness_ms: None,
                line: None,
                error: Some("connection refused".to_string()),
                instance: Some(1),
                filter_admitted: None,
            },
        ]
    }

    #[test]
    fn decisions_round_trip_through_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        write_decisions(&path, &sample()).unwrap();
        assert_eq!(read_decisions(&path).unwrap(), sample());
    }

    #[test]
    fn writes_one_object_per_line_with_contract_fields() {
        let output = {
            let mut writer = DecisionWriter::new(Vec::new());
            writer.write(&sample()[0]).unwrap();
            writer.finish().unwrap()
        };
        let text = String::from_utf8(output).unwrap();
        assert_eq!(text.lines().count(), 1);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["t"], 0.0);
        assert_eq!(value["customer"], "cust-10.0.0.1");
        assert_eq!(value["tier"], "basic");
        assert_eq!(value["status"], 200);
        assert!(value.get("error").is_none());
    }

    #[test]
    fn reads_minimal_objects_with_extra_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let text = "{\"t\":1,\"customer\":\"c\",\"tier\":\"basic\",\"status\":429,\"x\":true}\n\n";
        std::fs::write(&path, text).unwrap();
        let decisions = read_decisions(&path).unwrap();
        assert_eq!(decisions.len(), 1);
        assert_eq!(decisions[0].status, 429);
        assert!(!decisions[0].is_admitted());
    }

    #[test]
    fn parse_error_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        std::fs::write(
            &path,
            "{\"t\":1,\"customer\":\"c\",\"tier\":\"b\",\"status\":200}\n{}\n",
        )
        .unwrap();
        let error = read_decisions(&path).unwrap_err();
        assert!(matches!(error, DecisionsError::Parse { line: 2, .. }));
        assert!(error.to_string().contains("decisions.jsonl:2"));
    }
}
