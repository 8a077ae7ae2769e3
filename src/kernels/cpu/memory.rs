//! Returning freed memory to the system between images.

/// Hands the allocator's free memory back to the system (glibc's `malloc_trim`).
///
/// The vision tower makes and frees about a hundred megabytes of intermediates per image, in blocks of a few
/// MiB. glibc keeps freed blocks in its heaps, fragmented, so without a trim the peak resident set grows with
/// each further image; trimmed after the tower, it stays at the first image's (docs/performance.md).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages; it takes the allocator's locks itself.
    unsafe {
        libc::malloc_trim(0);
    }
}
