//! How the gateway's allocator (mimalloc, set in `main.rs`) gives memory back.
//!
//! mimalloc 3 keeps a freed page for a second before returning it to the OS, and a freed arena
//! range ten times as long (`purge_delay` 1,000 ms, `arena_purge_mult` 10). Under load that is
//! RSS held for nothing: in the bench's gateway, a third of the RSS after the reading phases
//! (136 MiB after the batches, 107 after the single readings, against 84 and 81 with freed
//! memory returned at once) and more after run events. The gateway returns it sooner unless
//! the operator has set `MIMALLOC_PURGE_DELAY` (mimalloc's own variable), which still wins.

/// `mi_option_purge_delay` in mimalloc.h: the options are an enum that mimalloc only appends
/// to (retired ones keep their place), and `libmimalloc-sys` has no constant for this one. A
/// test checks it is the option whose default is 1,000 ms.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory is kept for reuse before it goes back to the OS, in milliseconds.
pub const GATEWAY_PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Sets mimalloc's purge delay to [`GATEWAY_PURGE_DELAY_MS`] unless `MIMALLOC_PURGE_DELAY` is
/// set. Call once at start, before the runtime's threads exist.
#[allow(unsafe_code)]
pub fn return_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one integer option; mimalloc reads it on its next purge.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, GATEWAY_PURGE_DELAY_MS) }
}

/// The purge delay mimalloc uses now, in milliseconds.
#[allow(unsafe_code)]
pub fn purge_delay_ms() -> std::ffi::c_long {
    // SAFETY: reads one integer option.
    unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test, as the option is process-wide: option 15 is the purge delay (mimalloc 3's
    /// default of 1,000 ms), and the gateway's setting lands in it.
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        assert_eq!(
            purge_delay_ms(),
            1000,
            "option 15 is not mimalloc's purge delay"
        );
        return_freed_memory_promptly();
        assert_eq!(purge_delay_ms(), GATEWAY_PURGE_DELAY_MS);
    }
}
