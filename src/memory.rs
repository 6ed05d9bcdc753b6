//! Handing free memory back to the system between bursts of work.
//!
//! A daemon that has just issued a thousand certificates holds on to the
//! heap those orders grew: glibc's `free` returns memory to the system only
//! from the top of the heap, and only past a threshold. The daemon then
//! idles for weeks. So when a burst ends (the scheduler has no order
//! running, a reaper pass is done) `release` asks glibc for `malloc_trim`,
//! which gives back every whole free page, inside the heap as well as at
//! its top. It costs well under a millisecond for a heap of a few MiB.

/// Returns free heap pages to the system (glibc); nothing elsewhere.
pub(crate) fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it walks glibc's own free
    // lists under the arena locks, like any malloc or free call.
    unsafe {
        libc::malloc_trim(0);
    }
}
