//! Client behaviour of the generated log: addresses, user agents and request patterns.

use super::GenerateOptions;
use crate::random::SplitMix64;

/// Request pattern of a generated client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientKind {
    /// Watches videos: a manifest, then a segment every 2 to 8 s, in sessions.
    Viewer,
    /// Pages through the catalogue API every 1 to 4 s without pause.
    Crawler,
    /// Calls the API now and then over the whole span.
    Steady,
    /// Sends one to three requests.
    Light,
}

/// A generated client.
pub(super) struct Client {
    pub(super) kind: ClientKind,
    pub(super) address: String,
    pub(super) requests: usize,
    user_agent: &'static str,
}

/// One line of the generated log before formatting.
#[derive(Debug, Clone)]
pub(super) struct LogLine {
    pub(super) time: i64,
    pub(super) client: String,
    pub(super) method: &'static str,
    pub(super) path: String,
    pub(super) status: u16,
    pub(super) size: Option<u64>,
    pub(super) referer: Option<String>,
    pub(super) user_agent: &'static str,
    /// Written without the end of the user agent and its closing quote.
    pub(super) truncated: bool,
}

const PLAYER_AGENTS: [&str; 5] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
     Chrome/122.0.0.0 Safari/537.36",
    "AppleCoreMedia/1.0.0.21E219 (iPhone; U; CPU OS 17_4 like Mac OS X; en_us)",
    "ExoPlayerLib/2.19.1 (Linux; Android 14) Veo/3.2.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_3) AppleWebKit/605.1.15 (KHTML, like Gecko) \
     Version/17.3 Safari/605.1.15",
    "VLC/3.0.20 LibVLC/3.0.20",
];
const API_AGENTS: [&str; 4] = [
    "python-requests/2.31.0",
    "curl/8.5.0",
    "Go-http-client/1.1",
    "okhttp/4.12.0",
];
const CRAWLER_AGENT: &str =
    "catalog-sync/2.3 (+https://partner.example/bot) python-requests/2.31.0";

impl Client {
    pub(super) fn new(kind: ClientKind, requests: usize, random: &mut SplitMix64) -> Self {
        let user_agent = match kind {
            ClientKind::Viewer | ClientKind::Light => pick(&PLAYER_AGENTS, random),
            ClientKind::Steady => pick(&API_AGENTS, random),
            ClientKind::Crawler => CRAWLER_AGENT,
        };
        Client {
            kind,
            address: String::new(),
            requests,
            user_agent,
        }
    }

    /// Generates this client's requests within the options' span.
    pub(super) fn requests_over(
        &self,
        options: &GenerateOptions,
        random: &mut SplitMix64,
    ) -> Vec<LogLine> {
        let span = options.span_seconds.max(1);
        let mut lines = Vec::with_capacity(self.requests);
        match self.kind {
            ClientKind::Viewer => self.viewing_sessions(span, random, &mut lines),
            ClientKind::Crawler => self.crawl(span, random, &mut lines),
            ClientKind::Steady | ClientKind::Light => {
                for _ in 0..self.requests {
                    let offset = random.range(0, span);
                    let (method, path, status, size) = if self.kind == ClientKind::Steady {
                        api_request(random)
                    } else {
                        casual_request(random)
                    };
                    lines.push(self.line(offset, method, path, status, size, random));
                }
            }
        }
        for line in &mut lines {
            line.time += options.start_unix_seconds;
        }
        lines
    }

    fn viewing_sessions(&self, span: u64, random: &mut SplitMix64, lines: &mut Vec<LogLine>) {
        let mut left = self.requests;
        while left > 0 {
            let session = (random.range(40, 121) as usize).min(left);
            left -= session;
            let latest_start = span.saturating_sub(session as u64 * 8 + 1);
            let mut offset = random.range(0, latest_start.max(1));
            let video = random.range(1_000, 100_000);
            let quality = pick(&["480p", "720p", "1080p"], random);

            let manifest = format!("/videos/{video}/manifest.m3u8");
            lines.push(self.line(
                offset,
                "GET",
                manifest,
                200,
                Some(random.range(400, 1_200)),
                random,
            ));
            for segment in 1..session {
                offset += random.range(2, 9);
                let (path, status, size) = if segment % 50 == 0 {
                    (format!("/api/v1/videos/{video}/views"), 204, None)
                } else {
                    let path = format!("/videos/{video}/{quality}/segment-{segment:05}.ts");
                    let status = if random.range(0, 20) == 0 { 206 } else { 200 };
                    (path, status, Some(random.range(400_000, 2_500_000)))
                };
                let method = if status == 204 { "POST" } else { "GET" };
                lines.push(self.line(offset, method, path, status, size, random));
            }
        }
    }

    fn crawl(&self, span: u64, random: &mut SplitMix64, lines: &mut Vec<LogLine>) {
        let latest_start = span.saturating_sub(self.requests as u64 * 4 + 1);
        let mut offset = random.range(0, latest_start.max(1));
        for index in 0..self.requests {
            let path = if index % 3 == 0 {
                format!("/api/v1/videos?page={}&per_page=50", index / 3 + 1)
            } else {
                format!("/api/v1/videos/{}", random.range(1_000, 100_000))
            };
            let size = Some(random.range(1_000, 30_000));
            lines.push(self.line(offset, "GET", path, 200, size, random));
            offset += random.range(1, 5);
        }
    }

    fn line(
        &self,
        offset: u64,
        method: &'static str,
        path: String,
        status: u16,
        size: Option<u64>,
        random: &mut SplitMix64,
    ) -> LogLine {
        let referer = (self.kind == ClientKind::Viewer && random.range(0, 4) == 0)
            .then(|| "https://www.veo.example/watch".to_string());
        LogLine {
            time: i64::try_from(offset).unwrap_or(i64::MAX),
            client: self.address.clone(),
            method,
            path,
            status,
            size,
            referer,
            user_agent: self.user_agent,
            truncated: false,
        }
    }
}

/// Assigns distinct addresses from the documentation ranges (RFC 5737 and RFC 3849): heavy
/// clients from 198.51.100.0/24, the others from 192.0.2.0/24 and 203.0.113.0/24, then IPv6.
pub(super) fn assign_addresses(clients: &mut [Client], random: &mut SplitMix64) {
    let mut ipv4: Vec<String> = (1..255)
        .map(|host| format!("192.0.2.{host}"))
        .chain((1..255).map(|host| format!("203.0.113.{host}")))
        .collect();
    let mut heavy: Vec<String> = (1..255).map(|host| format!("198.51.100.{host}")).collect();
    let mut next_ipv6 = 1;

    for client in clients {
        let pool = if matches!(client.kind, ClientKind::Viewer | ClientKind::Crawler) {
            &mut heavy
        } else {
            &mut ipv4
        };
        client.address = if pool.is_empty() {
            next_ipv6 += random.range(1, 50);
            format!("2001:db8::{next_ipv6:x}")
        } else {
            let index = random.range(0, pool.len() as u64) as usize;
            pool.swap_remove(index)
        };
    }
}

fn api_request(random: &mut SplitMix64) -> (&'static str, String, u16, Option<u64>) {
    let video = random.range(1_000, 100_000);
    match random.range(0, 10) {
        0..=4 => (
            "GET",
            format!("/api/v1/videos/{video}"),
            200,
            Some(random.range(800, 4_000)),
        ),
        5..=6 => (
            "GET",
            format!("/api/v1/videos?page={}", random.range(1, 40)),
            200,
            Some(random.range(5_000, 30_000)),
        ),
        7 => ("POST", format!("/api/v1/videos/{video}/views"), 204, None),
        8 => (
            "GET",
            "/api/v1/usage?period=day".to_string(),
            200,
            Some(random.range(200, 900)),
        ),
        _ => ("GET", format!("/api/v1/videos/{video}"), 404, Some(64)),
    }
}

fn casual_request(random: &mut SplitMix64) -> (&'static str, String, u16, Option<u64>) {
    let video = random.range(1_000, 100_000);
    match random.range(0, 10) {
        0..=3 => (
            "GET",
            format!("/videos/{video}/manifest.m3u8"),
            200,
            Some(random.range(400, 1_200)),
        ),
        4..=5 => (
            "GET",
            format!("/videos/{video}/thumbnail.jpg"),
            200,
            Some(random.range(20_000, 80_000)),
        ),
        6 => ("GET", format!("/videos/{video}/thumbnail.jpg"), 304, None),
        7 => (
            "GET",
            "/api/v1/videos?page=1".to_string(),
            200,
            Some(random.range(5_000, 30_000)),
        ),
        8 => ("GET", "/robots.txt".to_string(), 200, Some(68)),
        _ => ("GET", "/favicon.ico".to_string(), 404, Some(153)),
    }
}

fn pick<T: Copy>(items: &[T], random: &mut SplitMix64) -> T {
    items[random.range(0, items.len() as u64) as usize]
}
