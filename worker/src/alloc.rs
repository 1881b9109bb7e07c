//! glibc allocator settings for training on CPU.
//!
//! With glibc's defaults every training step returns its large activation buffers to the
//! kernel and faults them back in on the next step. Raising the mmap threshold, never
//! trimming, and padding the heap top keeps them in the process (CANDLE-NOTES measured a
//! MiniLM LoRA step going from 595 to 450 ms; all three settings are needed).

/// Applies the settings (glibc on Linux; elsewhere nothing). Call once at start-up.
pub fn tune_for_training() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before the worker
    // allocates tensors, and glibc serialises it against other allocator calls.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
