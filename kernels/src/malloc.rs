//! The C allocator's handling of large buffers, which Burn's Flex backend allocates for every
//! op's output.
//!
//! glibc's `malloc` serves requests above 128 KiB with a fresh `mmap` and returns them to the
//! system on `free`; every page of such a buffer is then zero-filled by the kernel on first
//! touch, once per op. ResNet-18's activations at 224x224 are tens of megabytes per op, and page
//! faults took 5-19 % of kiln's samples in `perf` profiles of the ResNet benchmark.
//! [`keep_large_buffers`] raises the thresholds so that such buffers come from the heap and are
//! reused, as PyTorch's caching CPU allocator (or the jemalloc/tcmalloc it recommends) does.
//! The `kiln` command line turns it on at start; a library user calls it from `main`.
//! Whole-step effect, same-process A/B in `cargo bench --bench resnet` (`kiln` against
//! `kiln_default_malloc`): from -8 % to +10 % on ResNet-18 training at batch 8 x 224 over four
//! runs, within this machine's noise; the micro-benchmark of one SimpleCNN step's ops gained 30 %.

/// Serve buffers up to 256 MiB from the heap and keep up to 1 GiB of freed heap memory instead
/// of returning it to the system (`on`), or go back to glibc's defaults (128 KiB for both).
/// `on` also keeps every thread on the main heap (one arena): a training step run on a pool
/// thread ([`crate::on_pool`]) would otherwise allocate from that thread's own arena, whose
/// 64 MiB heaps are mapped and faulted in afresh (page faults up 10-90 % per run in `perf
/// stat`, and run-to-run swings of 25 %); glibc cannot go back to several arenas later.
/// Returns whether the allocator took the setting: `false` off glibc (musl, macOS, Windows),
/// where this does nothing.
pub fn keep_large_buffers(on: bool) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let (mmap, trim) = if on {
            (256 << 20, 1 << 30)
        } else {
            (128 << 10, 128 << 10)
        };
        // SAFETY: `mallopt` only changes allocator parameters; glibc documents calling it at any
        // time, from any thread.
        unsafe {
            let arenas = !on || libc::mallopt(libc::M_ARENA_MAX, 1) == 1;
            arenas
                && libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = on;
        false
    }
}
