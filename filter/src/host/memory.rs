//! An in-memory [`Host`] for native tests: shared data with real
//! compare-and-swap tokens, shared queues, one request's headers, and a
//! record of responses, gRPC calls, metrics and log lines.
//!
//! Clones made with [`MemoryHost::worker`] share shared data, queues and
//! the clock, like Envoy's worker VMs do, but keep their own request state.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use super::{Host, HostError, LogLevel, SetError, SharedValue};

/// Status the ABI returns for a missing queue.
const STATUS_NOT_FOUND: u32 = 1;

/// A hook run just before a compare-and-swap write to one key, to stand in
/// for another worker writing between this worker's read and write.
type InterleaveHook = Box<dyn FnOnce()>;

#[derive(Default)]
struct Store {
    now_ms: u64,
    data: HashMap<String, (Vec<u8>, u32)>,
    last_cas: u32,
    queues: Vec<(String, VecDeque<Vec<u8>>)>,
}

/// A local response recorded by [`Host::send_local_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status code.
    pub status: u32,
    /// Response headers in the order given.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
}

impl LocalResponse {
    /// Returns the first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Returns the body as text, empty when it is not UTF-8.
    pub fn body_text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or_default()
    }
}

/// A gRPC call recorded by [`Host::dispatch_grpc_call`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCall {
    /// Token returned to the caller.
    pub token: u32,
    /// Envoy cluster name.
    pub cluster: String,
    /// Fully qualified service name.
    pub service: String,
    /// Method name.
    pub method: String,
    /// Encoded request message.
    pub message: Vec<u8>,
    /// Call timeout.
    pub timeout: Duration,
}

#[derive(Default)]
struct Local {
    request_headers: Vec<(String, Vec<u8>)>,
    response_headers: Vec<(String, String)>,
    local_response: Option<LocalResponse>,
    grpc_calls: Vec<GrpcCall>,
    grpc_failure: Option<HostError>,
    tick_period: Option<Duration>,
    metric_names: Vec<String>,
    metrics: HashMap<u32, u64>,
    logs: Vec<(LogLevel, String)>,
    hooks: Vec<(String, InterleaveHook)>,
    shared_calls: Cell<u64>,
    properties: Vec<(Vec<String>, Vec<u8>)>,
    header_reads: Cell<u64>,
    property_reads: Cell<u64>,
}

/// In-memory host; see the module docs.
#[derive(Clone, Default)]
pub struct MemoryHost {
    store: Rc<RefCell<Store>>,
    local: Rc<RefCell<Local>>,
}

impl MemoryHost {
    /// Creates a host with empty shared data and the clock at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        let host = Self::default();
        host.store.borrow_mut().now_ms = now_ms;
        host
    }

    /// Creates another worker that shares this host's shared data, queues
    /// and clock but has its own request state.
    pub fn worker(&self) -> Self {
        Self {
            store: Rc::clone(&self.store),
            local: Rc::default(),
        }
    }

    /// Sets the shared clock.
    pub fn set_now_ms(&self, now_ms: u64) {
        self.store.borrow_mut().now_ms = now_ms;
    }

    /// Moves the shared clock forward.
    pub fn advance_ms(&self, delta_ms: u64) {
        self.store.borrow_mut().now_ms += delta_ms;
    }

    /// Starts a new request: clears request and response state and sets
    /// the request headers.
    pub fn start_request(&self, headers: &[(&str, &[u8])]) {
        let mut local = self.local.borrow_mut();
        local.request_headers = headers
            .iter()
            .map(|(name, value)| (name.to_ascii_lowercase(), value.to_vec()))
            .collect();
        local.response_headers.clear();
        local.local_response = None;
    }

    /// Returns the current value of a request header as text.
    pub fn request_header_text(&self, name: &str) -> Option<String> {
        let local = self.local.borrow();
        local
            .request_headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    }

    /// Returns how many values of a request header are present.
    pub fn request_header_count(&self, name: &str) -> usize {
        let local = self.local.borrow();
        local
            .request_headers
            .iter()
            .filter(|(key, _)| key == name)
            .count()
    }

    /// Returns the local response sent during the current request.
    pub fn local_response(&self) -> Option<LocalResponse> {
        self.local.borrow().local_response.clone()
    }

    /// Returns the first value of a header added to the response.
    pub fn response_header(&self, name: &str) -> Option<String> {
        let local = self.local.borrow();
        find_header(&local.response_headers, name).map(str::to_owned)
    }

    /// Returns the gRPC calls dispatched so far.
    pub fn grpc_calls(&self) -> Vec<GrpcCall> {
        self.local.borrow().grpc_calls.clone()
    }

    /// Makes every following gRPC dispatch fail with `error`, or succeed
    /// again with `None`.
    pub fn fail_grpc_dispatch(&self, error: Option<HostError>) {
        self.local.borrow_mut().grpc_failure = error;
    }

    /// Returns the total added to the counter named `name` so far.
    pub fn counter(&self, name: &str) -> u64 {
        let local = self.local.borrow();
        let id = local.metric_names.iter().position(|known| known == name);
        id.and_then(|id| local.metrics.get(&(id as u32)).copied())
            .unwrap_or(0)
    }

    /// Returns the names of the counters defined so far.
    pub fn counter_names(&self) -> Vec<String> {
        self.local.borrow().metric_names.clone()
    }

    /// Returns the log lines written so far.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.local.borrow().logs.clone()
    }

    /// Returns the timer period last set, if any.
    pub fn tick_period(&self) -> Option<Duration> {
        self.local.borrow().tick_period
    }

    /// Returns how many shared-data reads and writes this worker made.
    pub fn shared_data_calls(&self) -> u64 {
        self.local.borrow().shared_calls.get()
    }

    /// Returns how many request headers this worker read.
    pub fn request_header_reads(&self) -> u64 {
        self.local.borrow().header_reads.get()
    }

    /// Sets the value Envoy reports for the attribute at `path`, such as
    /// `["source", "address"]`. It stays until set again or cleared with
    /// `None`, across requests.
    pub fn set_property(&self, path: &[&str], value: Option<&[u8]>) {
        let mut local = self.local.borrow_mut();
        local
            .properties
            .retain(|(known, _)| known.as_slice() != path);
        if let Some(value) = value {
            let path = path.iter().map(|part| (*part).to_owned()).collect();
            local.properties.push((path, value.to_vec()));
        }
    }

    /// Returns how many attributes this worker read.
    pub fn property_reads(&self) -> u64 {
        self.local.borrow().property_reads.get()
    }

    /// Returns a shared-data value without counting it as a host call.
    pub fn peek_shared_data(&self, key: &str) -> Option<Vec<u8>> {
        let store = self.store.borrow();
        store.data.get(key).map(|(bytes, _)| bytes.clone())
    }

    /// Returns the shared-data keys that start with `prefix`.
    pub fn shared_data_keys(&self, prefix: &str) -> Vec<String> {
        let store = self.store.borrow();
        let mut keys: Vec<String> = store
            .data
            .keys()
            .filter(|key| key.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// Returns the number of messages waiting in a queue.
    pub fn queue_len(&self, queue_id: u32) -> usize {
        let store = self.store.borrow();
        let index = queue_id.checked_sub(1).map(|id| id as usize);
        index
            .and_then(|index| store.queues.get(index))
            .map_or(0, |(_, messages)| messages.len())
    }

    /// Runs `hook` just before this worker's next compare-and-swap write
    /// to `key`, after its read, so a test can interleave another writer.
    pub fn before_next_set(&self, key: &str, hook: impl FnOnce() + 'static) {
        let mut local = self.local.borrow_mut();
        local.hooks.push((key.to_owned(), Box::new(hook)));
    }

    fn count_shared_call(&self) {
        let local = self.local.borrow();
        local.shared_calls.set(local.shared_calls.get() + 1);
    }

    fn take_hook(&self, key: &str) -> Option<InterleaveHook> {
        let mut local = self.local.borrow_mut();
        let index = local
            .hooks
            .iter()
            .position(|(hook_key, _)| hook_key == key)?;
        Some(local.hooks.remove(index).1)
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

impl Host for MemoryHost {
    fn now_ms(&self) -> u64 {
        self.store.borrow().now_ms
    }

    fn get_shared_data(&self, key: &str) -> Result<SharedValue, HostError> {
        self.count_shared_call();
        let store = self.store.borrow();
        Ok(match store.data.get(key) {
            Some((bytes, cas)) => SharedValue {
                bytes: Some(bytes.clone()),
                cas: Some(*cas),
            },
            None => SharedValue::default(),
        })
    }

    fn set_shared_data(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        self.count_shared_call();
        if cas.is_some()
            && let Some(hook) = self.take_hook(key)
        {
            hook();
        }

        // Same rule as proxy-wasm-cpp-host: a token is checked only when
        // the key exists, and every write gets the next global token.
        let mut store = self.store.borrow_mut();
        if let (Some(cas), Some((_, current))) = (cas, store.data.get(key))
            && cas != *current
        {
            return Err(SetError::CasMismatch);
        }
        store.last_cas = store.last_cas.wrapping_add(1).max(1);
        let next = store.last_cas;
        store.data.insert(key.to_owned(), (value.to_vec(), next));
        Ok(())
    }

    fn register_shared_queue(&self, name: &str) -> Result<u32, HostError> {
        let mut store = self.store.borrow_mut();
        if let Some(index) = store.queues.iter().position(|(queue, _)| queue == name) {
            return Ok(index as u32 + 1);
        }
        store.queues.push((name.to_owned(), VecDeque::new()));
        Ok(store.queues.len() as u32)
    }

    fn resolve_shared_queue(&self, _vm_id: &str, name: &str) -> Result<Option<u32>, HostError> {
        let store = self.store.borrow();
        let index = store.queues.iter().position(|(queue, _)| queue == name);
        Ok(index.map(|index| index as u32 + 1))
    }

    fn enqueue_shared_queue(&self, queue_id: u32, message: &[u8]) -> Result<(), HostError> {
        let mut store = self.store.borrow_mut();
        let index = queue_id.checked_sub(1).ok_or(HostError(STATUS_NOT_FOUND))?;
        let (_, messages) = store
            .queues
            .get_mut(index as usize)
            .ok_or(HostError(STATUS_NOT_FOUND))?;
        messages.push_back(message.to_vec());
        Ok(())
    }

    fn dequeue_shared_queue(&self, queue_id: u32) -> Result<Option<Vec<u8>>, HostError> {
        let mut store = self.store.borrow_mut();
        let index = queue_id.checked_sub(1).ok_or(HostError(STATUS_NOT_FOUND))?;
        let (_, messages) = store
            .queues
            .get_mut(index as usize)
            .ok_or(HostError(STATUS_NOT_FOUND))?;
        Ok(messages.pop_front())
    }

    fn request_header(&self, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        let local = self.local.borrow();
        local.header_reads.set(local.header_reads.get() + 1);
        let value = local.request_headers.iter().find(|(key, _)| key == name);
        Ok(value.map(|(_, value)| value.clone()))
    }

    fn set_request_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        let mut local = self.local.borrow_mut();
        local.request_headers.retain(|(key, _)| key != name);
        local
            .request_headers
            .push((name.to_owned(), value.as_bytes().to_vec()));
        Ok(())
    }

    fn remove_request_header(&self, name: &str) -> Result<(), HostError> {
        let mut local = self.local.borrow_mut();
        local.request_headers.retain(|(key, _)| key != name);
        Ok(())
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        let local = self.local.borrow();
        local.property_reads.set(local.property_reads.get() + 1);
        let value = local
            .properties
            .iter()
            .find(|(known, _)| known.as_slice() == path);
        Ok(value.map(|(_, value)| value.clone()))
    }

    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        let mut local = self.local.borrow_mut();
        local
            .response_headers
            .push((name.to_owned(), value.to_owned()));
        Ok(())
    }

    fn send_local_response(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError> {
        let mut local = self.local.borrow_mut();
        local.local_response = Some(LocalResponse {
            status,
            headers: headers
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            body: body.to_vec(),
        });
        Ok(())
    }

    fn dispatch_grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, HostError> {
        let mut local = self.local.borrow_mut();
        if let Some(error) = local.grpc_failure {
            return Err(error);
        }
        let token = local.grpc_calls.len() as u32 + 1;
        local.grpc_calls.push(GrpcCall {
            token,
            cluster: cluster.to_owned(),
            service: service.to_owned(),
            method: method.to_owned(),
            message: message.to_vec(),
            timeout,
        });
        Ok(token)
    }

    fn define_counter(&self, name: &str) -> Result<u32, HostError> {
        let mut local = self.local.borrow_mut();
        if let Some(id) = local.metric_names.iter().position(|known| known == name) {
            return Ok(id as u32);
        }
        local.metric_names.push(name.to_owned());
        Ok(local.metric_names.len() as u32 - 1)
    }

    fn increment_metric(&self, metric_id: u32, offset: u64) -> Result<(), HostError> {
        let mut local = self.local.borrow_mut();
        *local.metrics.entry(metric_id).or_default() += offset;
        Ok(())
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), HostError> {
        self.local.borrow_mut().tick_period = Some(period);
        Ok(())
    }

    fn log(&self, level: LogLevel, message: &str) {
        let mut local = self.local.borrow_mut();
        local.logs.push((level, message.to_owned()));
    }
}
