//! SQLite's own page cache, wrapped so that a commit does not scan all of it.
//!
//! At the end of every write transaction SQLite truncates its page cache to the
//! database's size (`pcache1Truncate`). The default cache remembers the largest page
//! number it has ever held since the last truncation, and when that number lies far
//! beyond the database's end it drops pages by walking its whole hash table. One page
//! number always lies far beyond the end of a database smaller than 1 GiB: when a
//! b-tree rebalance swaps two pages, it parks one of them under the number of the
//! page that holds SQLite's lock byte (`PENDING_BYTE / page size + 1`, page 262,145
//! at 4 KiB pages) for an instant. After a rebalance the commit then walks every
//! bucket of a cache holding tens of thousands of pages to drop nothing: 9% of the
//! server's samples at 256 instances in flight (BENCHMARKS.md, "Seventh optimisation
//! pass").
//!
//! The wrapper passes every call to the default cache and keeps, per cache, an upper
//! bound of the page numbers present other than that parking number, and whether the
//! parking number is present. A truncation that can drop nothing is not passed on;
//! every other one is, so the cache's content is exactly what the default cache
//! alone would hold.
//!
//! The methods are installed process-wide, once, before SQLite initializes (the
//! first connection a process opens). A process that opened a connection earlier
//! keeps the default cache: it runs correctly, only slower.

use std::os::raw::{c_int, c_uint, c_void};
#[cfg(test)]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The byte offset SQLite locks on; the page holding it never holds data, and the
/// rebalance parks pages under the number after it. A build may move it only
/// through a test-only control, which weir never calls.
const PENDING_BYTE: c_uint = 0x4000_0000;

/// The default cache's methods, saved before the wrapper replaced them.
struct DefaultMethods(ffi::sqlite3_pcache_methods2);

// SAFETY: the methods are plain function pointers and SQLite's own argument pointer,
// which SQLite itself shares between threads.
unsafe impl Send for DefaultMethods {}
unsafe impl Sync for DefaultMethods {}

static DEFAULT: OnceLock<DefaultMethods> = OnceLock::new();
/// Whether the wrapper is the process's page cache.
static INSTALLED: OnceLock<bool> = OnceLock::new();
/// Truncations the default cache would have answered by walking its pages, answered
/// without (counted in this crate's tests only).
#[cfg(test)]
static WALKS_SAVED: AtomicU64 = AtomicU64::new(0);

/// One wrapped cache: the default cache, and what is known of the pages it holds.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    /// The page number a rebalance parks pages under.
    parking_key: c_uint,
    /// At least the largest page number present, the parking number aside.
    max_key: c_uint,
    /// Whether the parking number may be present.
    parked: bool,
    /// The default cache's own bound, as it keeps it (parking number included), to
    /// count the walks saved in this crate's tests.
    #[cfg(test)]
    default_max_key: c_uint,
}

/// Installs the wrapper as SQLite's page cache, if SQLite has not initialized yet in
/// this process; returns whether the wrapper is the page cache.
pub(crate) fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        let mut default = std::mem::MaybeUninit::<ffi::sqlite3_pcache_methods2>::zeroed();
        // SAFETY: GETPCACHE2 writes the current methods to the struct it is given.
        let rc =
            unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, default.as_mut_ptr()) };
        if rc != ffi::SQLITE_OK {
            tracing::debug!(
                rc,
                "SQLite already initialized: keeping its default page cache"
            );
            return false;
        }
        // SAFETY: SQLite filled it in (every field of the struct is plain data).
        let default = unsafe { default.assume_init() };
        let Some(_) = default.xCreate else {
            return false;
        };
        let default_arg = default.pArg;
        if DEFAULT.set(DefaultMethods(default)).is_err() {
            return false;
        }
        let wrapper = ffi::sqlite3_pcache_methods2 {
            iVersion: 1,
            pArg: default_arg,
            xInit: Some(init),
            xShutdown: Some(shutdown),
            xCreate: Some(create),
            xCachesize: Some(cachesize),
            xPagecount: Some(pagecount),
            xFetch: Some(fetch),
            xUnpin: Some(unpin),
            xRekey: Some(rekey),
            xTruncate: Some(truncate),
            xDestroy: Some(destroy),
            xShrink: Some(shrink),
        };
        // SAFETY: PCACHE2 copies the struct; SQLite has not initialized (GETPCACHE2
        // succeeded, and both run under the same once).
        let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &wrapper) };
        if rc != ffi::SQLITE_OK {
            tracing::debug!(rc, "SQLite refused the page cache: keeping its default");
            return false;
        }
        true
    })
}

/// Truncations the default cache would have walked its pages for, answered without,
/// since the process started.
#[cfg(test)]
pub(crate) fn walks_saved() -> u64 {
    WALKS_SAVED.load(Ordering::Relaxed)
}

fn default() -> &'static ffi::sqlite3_pcache_methods2 {
    // Only reachable through methods installed after DEFAULT was set.
    &DEFAULT.get().expect("the default page cache was saved").0
}

/// # Safety
/// `cache` was returned by [`create`] and not yet destroyed; SQLite calls a cache's
/// methods with that cache's mutex held, so no other reference exists meanwhile.
unsafe fn cache<'a>(cache: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    &mut *(cache as *mut Cache)
}

unsafe extern "C" fn init(arg: *mut c_void) -> c_int {
    match default().xInit {
        Some(method) => method(arg),
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn shutdown(arg: *mut c_void) {
    if let Some(method) = default().xShutdown {
        method(arg)
    }
}

unsafe extern "C" fn create(
    page_size: c_int,
    extra_size: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let Some(method) = default().xCreate else {
        return std::ptr::null_mut();
    };
    let inner = method(page_size, extra_size, purgeable);
    if inner.is_null() {
        return inner;
    }
    let page_size = c_uint::try_from(page_size).unwrap_or(1).max(1);
    let cache = Box::new(Cache {
        inner,
        parking_key: PENDING_BYTE / page_size + 1,
        max_key: 0,
        parked: false,
        #[cfg(test)]
        default_max_key: 0,
    });
    Box::into_raw(cache) as *mut ffi::sqlite3_pcache
}

unsafe extern "C" fn cachesize(wrapped: *mut ffi::sqlite3_pcache, pages: c_int) {
    if let Some(method) = default().xCachesize {
        method(cache(wrapped).inner, pages)
    }
}

unsafe extern "C" fn pagecount(wrapped: *mut ffi::sqlite3_pcache) -> c_int {
    match default().xPagecount {
        Some(method) => method(cache(wrapped).inner),
        None => 0,
    }
}

unsafe extern "C" fn fetch(
    wrapped: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create_flag: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    let cache = cache(wrapped);
    let Some(method) = default().xFetch else {
        return std::ptr::null_mut();
    };
    let page = method(cache.inner, key, create_flag);
    if !page.is_null() {
        #[cfg(test)]
        if create_flag != 0 {
            cache.default_max_key = cache.default_max_key.max(key);
        }
        // Present now (found or created): keep the bound true.
        if key == cache.parking_key {
            cache.parked = true;
        } else {
            cache.max_key = cache.max_key.max(key);
        }
    }
    page
}

unsafe extern "C" fn unpin(
    wrapped: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    // A discarded page leaves; the bound may stay above what remains.
    if let Some(method) = default().xUnpin {
        method(cache(wrapped).inner, page, discard)
    }
}

unsafe extern "C" fn rekey(
    wrapped: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old_key: c_uint,
    new_key: c_uint,
) {
    let cache = cache(wrapped);
    if let Some(method) = default().xRekey {
        method(cache.inner, page, old_key, new_key)
    }
    #[cfg(test)]
    {
        cache.default_max_key = cache.default_max_key.max(new_key);
    }
    // Keys are unique: the page that held the old number was the only one.
    if old_key == cache.parking_key {
        cache.parked = false;
    }
    if new_key == cache.parking_key {
        cache.parked = true;
    } else {
        cache.max_key = cache.max_key.max(new_key);
    }
}

unsafe extern "C" fn truncate(wrapped: *mut ffi::sqlite3_pcache, limit: c_uint) {
    let cache = cache(wrapped);
    let parked_dropped = cache.parked && cache.parking_key >= limit;
    if cache.max_key < limit && !parked_dropped {
        // No page numbered `limit` or above is present: nothing to drop.
        #[cfg(test)]
        {
            assert_nothing_at_or_above(cache, limit);
            if cache.default_max_key >= limit {
                WALKS_SAVED.fetch_add(1, Ordering::Relaxed);
            }
        }
        return;
    }
    if let Some(method) = default().xTruncate {
        method(cache.inner, limit)
    }
    // Every page numbered `limit` or above is gone.
    cache.max_key = cache.max_key.min(limit.saturating_sub(1));
    #[cfg(test)]
    {
        cache.default_max_key = cache.default_max_key.min(limit.saturating_sub(1));
    }
    if cache.parking_key >= limit {
        cache.parked = false;
    }
}

/// Checks, in this crate's tests, that a truncation the wrapper skips has nothing to
/// drop: no page at the parking number, nor at the first numbers from `limit` on.
#[cfg(test)]
unsafe fn assert_nothing_at_or_above(cache: &Cache, limit: c_uint) {
    let fetch = default().xFetch.expect("the default cache fetches");
    let last = cache.default_max_key.min(limit.saturating_add(4096));
    let parking = Some(cache.parking_key).filter(|key| *key >= limit);
    for key in (limit..=last).chain(parking) {
        // A lookup without create: it would pin a page it found, but finding one fails
        // the test anyway.
        assert!(
            fetch(cache.inner, key, 0).is_null(),
            "page {key} is present at a skipped truncation to {limit}"
        );
    }
}

unsafe extern "C" fn destroy(wrapped: *mut ffi::sqlite3_pcache) {
    // SAFETY: `create` made it with Box::into_raw, and SQLite destroys a cache once.
    let cache = Box::from_raw(wrapped as *mut Cache);
    if let Some(method) = default().xDestroy {
        method(cache.inner)
    }
}

unsafe extern "C" fn shrink(wrapped: *mut ffi::sqlite3_pcache) {
    if let Some(method) = default().xShrink {
        method(cache(wrapped).inner)
    }
}
