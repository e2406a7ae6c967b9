//! A generator of synthetic access logs in the combined format, shaped like a video API's
//! traffic: a few heavy clients watching videos segment by segment, a dozen steady API users,
//! a long tail of clients with a handful of requests, and one deliberately malformed line.
//!
//! The output depends only on the options, so a committed sample can be regenerated
//! byte for byte.

mod traffic;

use std::io::{self, Write};

use crate::access_log::LogTime;
use crate::random::SplitMix64;
use traffic::{Client, ClientKind, LogLine, assign_addresses};

/// Settings of [`generate_access_log`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOptions {
    /// Seed of every random choice.
    pub seed: u64,
    /// Lines to write, the malformed one included; at least 10.
    pub lines: usize,
    /// Unix time of the first possible request.
    pub start_unix_seconds: i64,
    /// Seconds of log time the requests spread over.
    pub span_seconds: u64,
}

impl Default for GenerateOptions {
    /// Seed 1, 2,500 lines over six hours from 2024-03-04 06:00:00 UTC.
    fn default() -> Self {
        GenerateOptions {
            seed: 1,
            lines: 2_500,
            start_unix_seconds: 1_709_532_000,
            span_seconds: 6 * 3_600,
        }
    }
}

/// Summary of a log written by [`generate_access_log`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedLog {
    /// Lines written.
    pub lines: usize,
    /// Line number (from 1) of the malformed line.
    pub malformed_line: usize,
    /// Distinct client addresses.
    pub clients: usize,
    /// The heavy clients' addresses and request counts, busiest first.
    pub heavy_clients: Vec<(String, usize)>,
}

/// Errors from generating a log.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Too few lines were requested for the traffic shape.
    #[error("invalid line count {0}: expected at least 10")]
    TooFewLines(usize),
    /// The output could not be written.
    #[error("failed to write the generated log: {0}")]
    Write(#[from] io::Error),
}

/// Writes a synthetic log to `output`, sorted by time.
///
/// Four heavy clients send 45% of the lines, in viewing sessions of one request every 2 to
/// 8 s or as an API crawler. Twelve medium clients send 20%, spread over the whole span.
/// Light clients with one to three requests each send the rest.
///
/// # Errors
/// Returns [`GenerateError::TooFewLines`] below 10 lines, or the writer's error.
pub fn generate_access_log(
    options: &GenerateOptions,
    output: &mut impl Write,
) -> Result<GeneratedLog, GenerateError> {
    if options.lines < 10 {
        return Err(GenerateError::TooFewLines(options.lines));
    }
    let mut random = SplitMix64::new(options.seed);
    let well_formed = options.lines - 1;
    let heavy_total = well_formed * 45 / 100;
    let medium_total = well_formed * 20 / 100;
    let light_total = well_formed - heavy_total - medium_total;

    let mut clients = Vec::new();
    for (index, share) in [35, 28, 22, 15].into_iter().enumerate() {
        let kind = if index == 2 {
            ClientKind::Crawler
        } else {
            ClientKind::Viewer
        };
        clients.push(Client::new(kind, heavy_total * share / 100, &mut random));
    }
    let heavy_assigned: usize = clients.iter().map(|client| client.requests).sum();
    clients[0].requests += heavy_total - heavy_assigned;
    for index in 0..12 {
        let requests = medium_total / 12 + usize::from(index < medium_total % 12);
        clients.push(Client::new(ClientKind::Steady, requests, &mut random));
    }
    let mut remaining = light_total;
    while remaining > 0 {
        let requests = (random.range(1, 4) as usize).min(remaining);
        clients.push(Client::new(ClientKind::Light, requests, &mut random));
        remaining -= requests;
    }

    assign_addresses(&mut clients, &mut random);

    let mut lines: Vec<LogLine> = clients
        .iter()
        .flat_map(|client| client.requests_over(options, &mut random))
        .collect();
    lines.sort_by_key(|line| line.time);

    // The malformed line sits about 60% into the file. It copies its neighbour with the user
    // agent cut off, the way a log writer truncates a line at a buffer limit.
    let malformed_index = well_formed * 3 / 5;
    let mut malformed = lines[malformed_index].clone();
    malformed.truncated = true;
    lines.insert(malformed_index, malformed);

    for line in &lines {
        writeln!(output, "{}", line.render())?;
    }
    output.flush()?;

    let mut heavy_clients: Vec<(String, usize)> = clients[..4]
        .iter()
        .map(|client| (client.address.clone(), client.requests))
        .collect();
    heavy_clients.sort_by_key(|(_, requests)| std::cmp::Reverse(*requests));
    Ok(GeneratedLog {
        lines: lines.len(),
        malformed_line: malformed_index + 1,
        clients: clients.len(),
        heavy_clients,
    })
}

impl LogLine {
    fn render(&self) -> String {
        let time = LogTime::utc(self.time);
        let referer = self.referer.as_deref().unwrap_or("-");
        let line = format!(
            "{} - - [{time}] \"{} {} HTTP/1.1\" {} {} \"{referer}\" \"{}",
            self.client,
            self.method,
            self.path,
            self.status,
            self.size
                .map_or_else(|| "-".to_string(), |size| size.to_string()),
            self.user_agent,
        );
        if self.truncated {
            // Cut inside the user agent, so its closing quote is missing.
            let keep = line.len() - self.user_agent.len() / 2;
            line[..keep].to_string()
        } else {
            line + "\""
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::access_log::AccessLogReader;

    fn generate(options: &GenerateOptions) -> (Vec<u8>, GeneratedLog) {
        let mut output = Vec::new();
        let summary = generate_access_log(options, &mut output).unwrap();
        (output, summary)
    }

    #[test]
    fn same_seed_gives_identical_log() {
        let options = GenerateOptions::default();
        assert_eq!(generate(&options).0, generate(&options).0);
        let other = GenerateOptions {
            seed: 2,
            ..options.clone()
        };
        assert_ne!(generate(&options).0, generate(&other).0);
    }

    #[test]
    fn log_parses_except_one_malformed_line() {
        let options = GenerateOptions::default();
        let (output, summary) = generate(&options);
        let items: Vec<_> = AccessLogReader::new(&output[..])
            .map(|i| i.unwrap())
            .collect();
        assert_eq!(items.len(), options.lines);
        assert_eq!(summary.lines, options.lines);

        let malformed: Vec<_> = items.iter().filter_map(|i| i.as_ref().err()).collect();
        assert_eq!(malformed.len(), 1);
        assert_eq!(malformed[0].line, summary.malformed_line);
        assert!(malformed[0].reason.contains("missing closing quote"));

        let entries: Vec<_> = items.iter().filter_map(|i| i.as_ref().ok()).collect();
        let end = options.start_unix_seconds + options.span_seconds as i64;
        assert!(
            entries
                .iter()
                .all(|e| e.time.unix_seconds >= options.start_unix_seconds)
        );
        assert!(entries.iter().all(|e| e.time.unix_seconds < end));
        assert!(entries.windows(2).all(|w| w[0].time <= w[1].time));
    }

    #[test]
    fn heavy_clients_exceed_basic_quota() {
        let options = GenerateOptions::default();
        let (output, summary) = generate(&options);
        let entries: Vec<_> = AccessLogReader::new(&output[..])
            .filter_map(|i| i.unwrap().ok())
            .collect();

        // At 100x, 60 real seconds are 6,000 log seconds.
        let mut busiest_window: HashMap<&str, usize> = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            let in_window = entries[index..]
                .iter()
                .take_while(|e| e.time.unix_seconds - entry.time.unix_seconds < 6_000)
                .filter(|e| e.client == entry.client)
                .count();
            let best = busiest_window.entry(&entry.client).or_default();
            *best = (*best).max(in_window);
        }
        let over_quota = busiest_window.values().filter(|count| **count > 60).count();
        assert!(
            over_quota >= 3,
            "only {over_quota} clients exceed 60 per minute"
        );
        assert!(over_quota <= 6, "{over_quota} clients exceed 60 per minute");
        assert!(summary.clients > 350, "{} clients", summary.clients);
        assert!(summary.heavy_clients[0].1 > 300);
    }

    #[test]
    fn rejects_tiny_logs() {
        let options = GenerateOptions {
            lines: 3,
            ..GenerateOptions::default()
        };
        let error = generate_access_log(&options, &mut Vec::new()).unwrap_err();
        assert!(matches!(error, GenerateError::TooFewLines(3)));
    }
}
