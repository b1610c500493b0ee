//! The heap gauge (`densepush_heap_allocated_bytes`): bytes allocated and not yet freed, counted by a thin
//! wrapper around the system allocator, so reading it costs one atomic load.
//!
//! It replaces glibc's `mallinfo2`, which walks every free chunk of every arena while holding that arena's lock.
//! Measured on this project's 2-core test machine (a thread holding 100k-1M live small chunks with as many
//! free ones between them, timing batches of small allocations while another thread called `mallinfo2` once a
//! second, as one dashboard tab does): each call blocked the allocating thread for 2-5 ms at 100k chunks, about
//! 45 ms at 300k and about 110 ms at 1M; polled every 10 ms (a few tabs and a scraper) the allocating thread
//! spent 2.8 s of 5 s blocked at 300k. A reactor is that allocating thread.
//!
//! It owns the count only: [`CountingAllocator`] must be installed as the `#[global_allocator]` (the binary
//! does, in `main.rs`); until it is, [`allocated_bytes`] is `None`. Each thread adds to its own counter and
//! folds it into the shared one every [`FLUSH_BYTES`], so threads do not contend on one cache line; the gauge is
//! therefore exact to within `FLUSH_BYTES` per thread. Sizes are those requested (allocator overhead is not
//! counted); a thread that exits loses its unflushed remainder (densepush's threads live as long as the
//! process).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};

/// Hands whole free pages inside the allocator's heaps back to the kernel (glibc `malloc_trim(0)`; a no-op
/// elsewhere). A connection storm leaves freed memory behind that nothing at rest reuses — the handshake
/// deadlines' timer entries, the index's hash table at each of its previous sizes, hand-over messages — about
/// 15-25 bytes per connection measured at 15,000 connections, resident until trimmed. It walks the free
/// chunks of every arena under that arena's lock, so it is called rarely (see `reactor::TRIM_EVERY`) and only
/// after the heap changed (`reactor::TRIM_AFTER_BYTES`).
pub fn release_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes a thread's own count may drift before it is folded into the shared one.
pub const FLUSH_BYTES: i64 = 64 * 1024;

/// Bytes allocated and not freed, as folded in by every thread so far.
static ALLOCATED: AtomicI64 = AtomicI64::new(0);
/// Set by the first fold: the counting allocator is the one in use.
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    // A `const` initialiser and no destructor: reaching it never allocates, so the allocator may use it.
    static UNFLUSHED: Cell<i64> = const { Cell::new(0) };
}

/// The system allocator, counting what it hands out and gets back.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAllocator;

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract; the counting
// around it neither allocates nor touches the memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            record(layout.size() as i64);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            record(layout.size() as i64);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        record(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            record(new_size as i64 - layout.size() as i64);
        }
        new
    }
}

/// Adds `delta` to this thread's count, folding it into the shared one past [`FLUSH_BYTES`].
fn record(delta: i64) {
    let fold = UNFLUSHED.try_with(|local| {
        let sum = local.get() + delta;
        if sum.abs() >= FLUSH_BYTES {
            local.set(0);
            sum
        } else {
            local.set(sum);
            0
        }
    });
    // Without thread-local storage (never, for this const one; kept for safety) count directly.
    let fold = fold.unwrap_or(delta);
    if fold != 0 {
        ALLOCATED.fetch_add(fold, Relaxed);
        if !INSTALLED.load(Relaxed) {
            INSTALLED.store(true, Relaxed);
        }
    }
}

/// Heap bytes allocated and not freed, to within [`FLUSH_BYTES`] per thread; `None` unless
/// [`CountingAllocator`] is the global allocator. Takes no lock.
pub fn allocated_bytes() -> Option<u64> {
    INSTALLED
        .load(Relaxed)
        .then(|| ALLOCATED.load(Relaxed).max(0) as u64)
}

// The library's own unit tests run with the counting allocator too, so the gauge can be tested here.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: CountingAllocator = CountingAllocator;

/// Held by the unit tests that measure the gauge around a large block, so no two of them overlap (other tests'
/// churn is far smaller than the blocks).
#[cfg(test)]
pub(crate) static BIG_BLOCKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    /// Other tests allocate and free concurrently, so compare with blocks far larger than their churn.
    const BLOCK: usize = 64 << 20;

    fn big_blocks() -> std::sync::MutexGuard<'static, ()> {
        BIG_BLOCKS.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn the_count_follows_an_allocation_and_its_release() {
        let _serial = big_blocks();
        let before = allocated_bytes().expect("installed for unit tests");
        let block = vec![0u8; BLOCK];
        let during = allocated_bytes().unwrap();
        drop(block);
        let after = allocated_bytes().unwrap();
        assert!(
            during >= before + BLOCK as u64 * 3 / 4,
            "{before} -> {during}"
        );
        assert!(after + (BLOCK as u64) / 2 <= during, "{during} -> {after}");
    }

    #[test]
    fn growing_a_vector_counts_the_new_size() {
        let _serial = big_blocks();
        let before = allocated_bytes().unwrap();
        let mut v = vec![0u8; 1 << 20];
        v.resize(BLOCK, 1);
        let during = allocated_bytes().unwrap();
        assert!(
            during >= before + BLOCK as u64 * 3 / 4,
            "{before} -> {during}"
        );
        drop(v);
    }

    #[test]
    fn small_allocations_stay_within_one_flush_of_the_truth_on_this_thread() {
        UNFLUSHED.with(|local| assert!(local.get().abs() < FLUSH_BYTES));
        let boxes: Vec<Box<[u8; 100]>> = (0..10_000).map(|_| Box::new([0; 100])).collect();
        UNFLUSHED.with(|local| assert!(local.get().abs() < FLUSH_BYTES));
        drop(boxes);
    }
}
