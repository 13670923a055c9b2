//! Gives start-up code back to the kernel.
//!
//! Measured on the release build: an idle agent in fleet mode had 16.4 MiB
//! resident, of which only 1.6 MiB was its own data (heap, stacks); about
//! 11 MiB were pages of its executable. Most of those ran once, while
//! loading and optimising models, parsing configuration and connecting,
//! and stay mapped (the kernel also maps neighbouring cached pages around
//! each fault). After start-up and after each model activation the agent
//! asks the kernel to page its code mappings out
//! (`MADV_PAGEOUT`, Linux 5.4+); what the idle loop and inference use is
//! faulted back in from the page cache at once (minor faults). Measured
//! that way the same agent settles at 7.8 MiB.
//!
//! The same holds for the shared libraries a native build loads (ONNX
//! Runtime, TFLite), whose start-up code (graph optimisation) is large.
//!
//! Freed heap goes back too: selecting a runtime loads the model in every
//! candidate and drops the losers, and glibc's allocator keeps what they
//! freed. With glibc the same moment calls `malloc_trim(0)`, which returns
//! free heap pages to the kernel (musl's allocator returns them by itself).
//!
//! This only ever touches private, non-writable file mappings (the
//! executable's and the libraries' code and read-only data): clean pages
//! whose content the kernel reloads from the file, so it cannot change what
//! the program sees. Where the call is not supported (older kernels, other
//! systems) nothing happens.

/// Pages the code out once `delay` has passed (so whatever was
/// starting, loading or connecting has finished), off the async workers.
pub fn page_out_after(delay: std::time::Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        match tokio::task::spawn_blocking(|| {
            release_free_heap();
            page_out_code()
        })
        .await
        {
            Ok(Some(bytes)) => tracing::debug!(bytes, "start-up code paged out"),
            Ok(None) => tracing::debug!("paging out code is not supported here"),
            Err(e) => tracing::debug!(error = %e, "page-out task failed"),
        }
    });
}

/// Pages out the agent's code mappings; returns the bytes advised, or
/// `None` where this is not supported.
pub fn page_out_code() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        linux::page_out_code()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Unmaps this process's clean code pages (`MADV_DONTNEED`), for a
/// process that shares its executable with another: the agent's
/// supervisor runs the same file as its child, and `MADV_PAGEOUT` leaves
/// a page that two processes map resident. Once the supervisor has let go
/// of them, the agent can page them out. Returns the bytes advised, or
/// `None` where this is not supported.
pub fn unmap_clean_code() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        linux::unmap_clean_code()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The mappings [`code_ranges`] picks in a `/proc/self/smaps` text that
/// hold no anonymous (written, copied-on-write) page: relocated read-only
/// data (RELRO) is private and non-writable too, but its pages were
/// written before it was protected, and dropping them would lose the
/// relocations.
pub fn clean_code_ranges(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let header = line
            .split_whitespace()
            .next()
            .and_then(|f| f.split_once('-'))
            .filter(|(a, b)| {
                !a.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_hexdigit())
            });
        if header.is_some() {
            current = code_ranges(line).first().copied();
        } else if let Some(kb) = line.strip_prefix("Anonymous:") {
            let anonymous = kb.trim().trim_end_matches("kB").trim() != "0";
            if let Some(range) = current.take() {
                if !anonymous {
                    out.push(range);
                }
            }
        }
    }
    out
}

/// One malloc arena for the whole process (glibc; elsewhere a no-op).
/// glibc gives busy threads arenas of their own, and each keeps freed
/// memory it cannot return; with one arena an idle agent serving an ONNX
/// Runtime model measured 17.9 MiB instead of 20.7 MiB. The agent's few
/// threads rarely allocate at once, so the shared arena costs no
/// measurable latency. Call before any thread starts.
pub fn single_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    linux::single_malloc_arena();
}

/// Returns the allocator's free pages to the kernel (glibc; elsewhere a
/// no-op).
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    linux::release_free_heap();
}

/// The address ranges of private, non-writable mappings of files (the
/// executable and shared libraries) in a `/proc/self/maps` text.
pub fn code_ranges(maps: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?;
            let writable = perms.as_bytes().get(1) == Some(&b'w');
            let private = perms.as_bytes().get(3) == Some(&b'p');
            if writable || !private || !path.starts_with('/') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end))
        })
        .collect()
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod linux {
    #[cfg(target_env = "gnu")]
    pub fn single_malloc_arena() {
        // SAFETY: mallopt only sets an allocator parameter; it takes no
        // pointers and is called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }

    #[cfg(target_env = "gnu")]
    pub fn release_free_heap() {
        // SAFETY: malloc_trim only walks glibc's own free lists and
        // returns unused pages; it is thread-safe and takes no pointers.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    pub fn unmap_clean_code() -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut advised = 0u64;
        for (start, end) in super::clean_code_ranges(&smaps) {
            // SAFETY: the range is a whole private, non-writable file
            // mapping of this process (from /proc/self/smaps, page
            // aligned) without a single anonymous page: every page is the
            // file's content, which the next access faults back in
            // unchanged. It cannot be written in between (read-only).
            let rc = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
            };
            if rc != 0 {
                return None;
            }
            advised += (end - start) as u64;
        }
        Some(advised)
    }

    pub fn page_out_code() -> Option<u64> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        let mut advised = 0u64;
        for (start, end) in super::code_ranges(&maps) {
            // SAFETY: the range is a whole mapping of this process taken
            // from /proc/self/maps (page aligned), and it is a private,
            // non-writable mapping of a file: MADV_PAGEOUT
            // only drops clean pages, which the kernel reloads unchanged
            // from the file on the next access. No memory the program can
            // observe changes.
            let rc = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT)
            };
            if rc != 0 {
                return None;
            }
            advised += (end - start) as u64;
        }
        Some(advised)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_read_only_file_mappings_are_picked() {
        let maps = "\
55d0a0000000-55d0a0100000 r--p 00000000 08:01 123 /opt/edgefleet-agent
55d0a0100000-55d0a0900000 r-xp 00100000 08:01 123 /opt/edgefleet-agent
55d0a0900000-55d0a0a00000 rw-p 00900000 08:01 123 /opt/edgefleet-agent
55d0a0a00000-55d0a0b00000 r--s 00000000 08:01 124 /dev/shm/shared
7f0000000000-7f0000100000 r-xp 00000000 08:01 200 /usr/lib/libc.so.6
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
";
        assert_eq!(
            code_ranges(maps),
            vec![
                (0x55d0a0000000, 0x55d0a0100000),
                (0x55d0a0100000, 0x55d0a0900000),
                (0x7f0000000000, 0x7f0000100000)
            ]
        );
    }

    #[test]
    fn mappings_with_anonymous_pages_are_not_unmapped() {
        let smaps = "\
55d0a0000000-55d0a0100000 r--p 00000000 08:01 123 /opt/edgefleet-agent
Size:               1024 kB
Anonymous:             0 kB
55d0a0100000-55d0a0900000 r-xp 00100000 08:01 123 /opt/edgefleet-agent
Size:               8192 kB
Anonymous:             0 kB
55d0a0900000-55d0a0a00000 r--p 00900000 08:01 123 /opt/edgefleet-agent
Size:               1024 kB
Anonymous:            48 kB
55d0a0a00000-55d0a0b00000 rw-p 00a00000 08:01 123 /opt/edgefleet-agent
Anonymous:             4 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
Anonymous:             0 kB
";
        assert_eq!(
            clean_code_ranges(smaps),
            vec![
                (0x55d0a0000000, 0x55d0a0100000),
                (0x55d0a0100000, 0x55d0a0900000)
            ]
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn unmapping_clean_code_keeps_the_program_running() {
        if let Some(bytes) = unmap_clean_code() {
            assert!(bytes > 0);
        }
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn paging_out_keeps_the_program_running() {
        // The test binary's own code: it must go on running normally.
        if let Some(bytes) = page_out_code() {
            assert!(bytes > 0);
        }
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
    }
}
