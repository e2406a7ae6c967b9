//! The message of a failed gRPC call. The SDK's `get_grpc_status` turns
//! the message into a `String` with `unwrap`, so a message that is not
//! UTF-8 would trap the VM and stop the sync role. This reads the same
//! host call and decodes the bytes lossily instead.

#![allow(unsafe_code)]

use proxy_wasm::types::Status;

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_get_status(
        return_code: *mut u32,
        return_message_data: *mut *mut u8,
        return_message_size: *mut usize,
    ) -> Status;
}

/// Returns the status message of the gRPC call whose reply is being
/// handled, or `None` when the host has none.
pub fn grpc_status_message() -> Option<String> {
    let mut code = 0;
    let mut data = std::ptr::null_mut();
    let mut size = 0;
    // SAFETY: the three pointers are valid for writes for the whole call.
    let status = unsafe { proxy_get_status(&mut code, &mut data, &mut size) };
    if status != Status::Ok || data.is_null() {
        return None;
    }
    // SAFETY: the host allocated the message through the SDK's
    // `proxy_on_memory_allocate`, a boxed slice of exactly `size` bytes, and
    // hands it to the module, which frees it when `bytes` is dropped.
    let bytes = unsafe { Vec::from_raw_parts(data, size, size) };
    Some(String::from_utf8_lossy(&bytes).into_owned())
}
