//! A switch that says no gradient is wanted (PyTorch's `torch.no_grad()`).
//!
//! candle records the graph of every op whose input depends on a variable. Generation with a
//! trainable LoRA adapter would therefore keep every activation of a sequence alive through its
//! key/value cache, and would route the frozen base products around the fused decoding kernels
//! (which skip inputs that carry a graph). Inside [`no_grad`] the adapter uses its weights
//! detached and every linear layer detaches its output, so nothing is recorded.

use std::cell::Cell;

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f` with gradient recording off on this thread (nestable; restored on panic too).
///
/// ```
/// assert!(qlora::ops::grad_enabled());
/// qlora::ops::no_grad(|| assert!(!qlora::ops::grad_enabled()));
/// assert!(qlora::ops::grad_enabled());
/// ```
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            DEPTH.with(|d| d.set(d.get() - 1));
        }
    }
    DEPTH.with(|d| d.set(d.get() + 1));
    let _restore = Restore;
    f()
}

/// Whether ops on this thread should record their graph (false inside [`no_grad`]).
pub fn grad_enabled() -> bool {
    DEPTH.with(|d| d.get() == 0)
}
