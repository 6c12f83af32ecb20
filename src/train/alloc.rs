//! Keeping freed memory for reuse during training.
//!
//! A training step allocates and frees gigabytes of activations. glibc's allocator hands large
//! blocks back to the kernel (`munmap`, heap trimming) as soon as they are freed, so the next
//! step faults the same amount in again and the kernel zeroes every page: ~17–25% of a CPU step
//! on the SmolLM2-135M shape (FACTS.md: 4.72 s → 3.93 s per step with these settings). Telling
//! the allocator to keep freed memory makes the steady state allocation-free at the kernel
//! level; the process's resident memory then stays at its high-water mark instead of shrinking
//! between steps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

/// Blocks above this many bytes are still mapped on their own (and returned when freed).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Extra bytes requested each time the heap grows, so it grows rarely.
const TOP_PAD: i32 = 1 << 30;

/// Switches glibc's allocator to keep freed memory for reuse (once per process; a no-op on
/// other allocators and platforms). [`crate::train::train`] calls it; call it yourself before a
/// hand-written training loop.
///
/// Respects the user: nothing changes when `QLORA_KEEP_FREED_MEMORY=0` is set or when any of
/// glibc's own `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_` variables
/// is. Returns whether the allocator was tuned by this or an earlier call.
pub fn keep_freed_memory() -> bool {
    static ONCE: Once = Once::new();
    static TUNED: AtomicBool = AtomicBool::new(false);
    ONCE.call_once(|| {
        let opted_out = std::env::var("QLORA_KEEP_FREED_MEMORY").is_ok_and(|v| v == "0")
            || [
                "MALLOC_MMAP_THRESHOLD_",
                "MALLOC_TRIM_THRESHOLD_",
                "MALLOC_TOP_PAD_",
            ]
            .iter()
            .any(|k| std::env::var_os(k).is_some());
        if !opted_out {
            TUNED.store(tune(), Ordering::SeqCst);
        }
    });
    TUNED.load(Ordering::SeqCst)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
            && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn tuning_is_idempotent() {
        let first = super::keep_freed_memory();
        assert_eq!(super::keep_freed_memory(), first);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if std::env::var_os("QLORA_KEEP_FREED_MEMORY").is_none()
            && std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none()
            && std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
            && std::env::var_os("MALLOC_TOP_PAD_").is_none()
        {
            assert!(first, "glibc accepts the parameters");
        }
    }
}
