//! A VFS over SQLite's own that writes a commit's WAL frames in one call.
//!
//! SQLite writes each WAL frame with two `pwrite` calls, its 24-byte header and then
//! its page, so a commit of 6 pages makes 12 calls before its fsync, and a group commit
//! of 50 pages 100. On this project's machine 12 small `pwrite` calls take about 60 µs
//! where one `pwritev` of the same bytes takes 8 (BENCHMARKS.md, "Seventh optimisation
//! pass"): a step at one instance in flight pays that on its critical path.
//!
//! The VFS `weir-wal` passes everything to the default VFS, except that a WAL file it
//! opens collects writes that continue the previous one, and writes the run in one call
//! before anything else touches the file: a sync, a read, a truncation, a size query, a
//! file control, a close, or a write elsewhere. Durability is unchanged: SQLite makes a
//! commit visible and returns only after the WAL's sync, and the sync writes the run
//! first and fails if that write fails. That holds with `synchronous=FULL` only, which
//! the writer asserts when it opens: with `NORMAL` SQLite does not sync the WAL at a
//! commit, and readers would look for frames still held back (tried: the first read
//! failed with "disk I/O error"). Only the store's writer connection opens the
//! database through it; readers never write the WAL.
//!
//! It also times each sync of a WAL file, the fsync a commit waits for, into the
//! histogram the thread that commits names with [`SyncsRecordedIn`]: what a disk's
//! sync costs is the first thing an operator asks of a durable store, and the figure
//! every other cost of a commit is measured against.
//!
//! The VFS is registered once per process, after the page cache is installed (SQLite
//! initializes at registration).

use std::cell::RefCell;
use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use rusqlite::ffi;

use crate::latency::LatencyHistogram;

/// Name of the VFS.
const VFS_NAME: &CStr = c"weir-wal";

/// Most bytes a WAL file holds back before writing them; a larger transaction writes
/// in runs of about this size. A group commit of 256 partitions' batches is about
/// 100 frames, 400 KiB.
pub(crate) const WAL_WRITE_BUFFER_MAX: usize = 1024 * 1024;

/// SQLite's largest page: the most one write of a WAL frame's page adds to a run that
/// is still under `WAL_WRITE_BUFFER_MAX`.
const PAGE_SIZE_MAX: usize = 64 * 1024;

/// Most bytes passed to the default VFS in one write: SQLite's unix VFS keeps only the
/// low 17 bits of a write's length (it never writes more than a 64 KiB page at once
/// itself), so a run is written in pieces of 64 KiB, 16 frames of 4 KiB each.
const INNER_WRITE_MAX: usize = PAGE_SIZE_MAX;

/// Writes SQLite asked a WAL file for, and writes passed to the default VFS, in this
/// crate's tests.
#[cfg(test)]
pub(crate) static WRITES: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

thread_local! {
    /// Where this thread's WAL syncs are counted, while [`SyncsRecordedIn`] says so.
    static SYNC_HISTOGRAM: RefCell<Option<Arc<LatencyHistogram>>> = const { RefCell::new(None) };
}

/// While it lives, the WAL syncs of the thread that made it are counted in its
/// histogram. The store's writer makes one around each transaction.
pub(crate) struct SyncsRecordedIn(());

impl SyncsRecordedIn {
    pub(crate) fn new(histogram: &Arc<LatencyHistogram>) -> SyncsRecordedIn {
        SYNC_HISTOGRAM.with(|current| *current.borrow_mut() = Some(histogram.clone()));
        SyncsRecordedIn(())
    }
}

impl Drop for SyncsRecordedIn {
    fn drop(&mut self) {
        SYNC_HISTOGRAM.with(|current| *current.borrow_mut() = None);
    }
}

/// Whether the VFS is registered (it lives for the process once it is).
static REGISTERED: OnceLock<bool> = OnceLock::new();

/// The methods of a WAL file opened through the VFS.
static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

/// Registers the VFS (not as the default), once; returns its name for
/// `Connection::open_with_flags_and_vfs`, or `None` if SQLite refused it.
pub(crate) fn register() -> Option<&'static CStr> {
    let registered = *REGISTERED.get_or_init(|| {
        // SAFETY: a null name finds the default VFS, which lives for the process.
        let inner = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
        if inner.is_null() {
            return false;
        }
        // SAFETY: `inner` is a valid VFS; a copy keeps its methods and app data, so
        // every method but xOpen runs as SQLite's own.
        let mut vfs = unsafe { *inner };
        let size = usize::try_from(vfs.szOsFile)
            .ok()
            .and_then(|inner| c_int::try_from(std::mem::size_of::<WalFile>() + inner).ok());
        let Some(size) = size else {
            return false;
        };
        vfs.szOsFile = size;
        vfs.zName = VFS_NAME.as_ptr();
        vfs.pNext = std::ptr::null_mut();
        vfs.xOpen = Some(open);
        let vfs = Box::into_raw(Box::new(VfsWithInner { vfs, inner }));
        // SAFETY: `vfs` lives for the process (leaked); not made the default.
        let rc = unsafe { ffi::sqlite3_vfs_register(vfs as *mut ffi::sqlite3_vfs, 0) };
        if rc != ffi::SQLITE_OK {
            tracing::debug!(rc, "SQLite refused the WAL-writing VFS");
            return false;
        }
        true
    });
    registered.then_some(VFS_NAME)
}

/// The VFS struct SQLite sees, followed by the VFS it wraps.
#[repr(C)]
struct VfsWithInner {
    vfs: ffi::sqlite3_vfs,
    inner: *mut ffi::sqlite3_vfs,
}

/// The head of a WAL file opened through the VFS; the default VFS's file follows it
/// in the same allocation (SQLite allocates `szOsFile` bytes).
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    /// The writes held back, and the offset of their first byte.
    pending: *mut Pending,
}

struct Pending {
    offset: i64,
    bytes: Vec<u8>,
}

/// # Safety
/// `file` is a file this VFS opened (its WAL files use [`WAL_METHODS`]).
unsafe fn inner_file(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    (file as *mut u8).add(std::mem::size_of::<WalFile>()) as *mut ffi::sqlite3_file
}

/// # Safety
/// `file` is a file this VFS opened; its default-VFS file is open.
unsafe fn inner_methods<'a>(file: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
    &*(*inner_file(file)).pMethods
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let inner_vfs = (*(vfs as *mut VfsWithInner)).inner;
    let Some(inner_open) = (*inner_vfs).xOpen else {
        return ffi::SQLITE_CANTOPEN;
    };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // Any other file is the default VFS's own, in the same memory: no detour.
        return inner_open(inner_vfs, name, file, flags, out_flags);
    }
    let wal = file as *mut WalFile;
    (*wal).base.pMethods = std::ptr::null();
    (*wal).pending = std::ptr::null_mut();
    let rc = inner_open(inner_vfs, name, inner_file(file), flags, out_flags);
    if rc != ffi::SQLITE_OK {
        // SQLite closes a file only if its methods are set; the default VFS cleaned up.
        return rc;
    }
    // Sized once for the most it can hold, so it never grows by copying.
    (*wal).pending = Box::into_raw(Box::new(Pending {
        offset: 0,
        bytes: Vec::with_capacity(WAL_WRITE_BUFFER_MAX + PAGE_SIZE_MAX),
    }));
    (*wal).base.pMethods = &WAL_METHODS;
    ffi::SQLITE_OK
}

/// Writes what is held back, in one call.
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    let pending = &mut *(*(file as *mut WalFile)).pending;
    if pending.bytes.is_empty() {
        return ffi::SQLITE_OK;
    }
    let Some(inner_write) = inner_methods(file).xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let mut rc = ffi::SQLITE_OK;
    let mut offset = pending.offset;
    for piece in pending.bytes.chunks(INNER_WRITE_MAX) {
        // At most INNER_WRITE_MAX bytes: fits a c_int and an i64.
        let length = piece.len() as c_int;
        #[cfg(test)]
        WRITES[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rc = inner_write(
            inner_file(file),
            piece.as_ptr() as *const c_void,
            length,
            offset,
        );
        if rc != ffi::SQLITE_OK {
            break;
        }
        offset += i64::from(length);
    }
    pending.bytes.clear();
    rc
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    let Ok(length) = usize::try_from(amount) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    #[cfg(test)]
    WRITES[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Through the raw pointer only: `flush` borrows the same run.
    let pending = (*(file as *mut WalFile)).pending;
    let continues = !(*pending).bytes.is_empty()
        && i64::try_from((*pending).bytes.len())
            .is_ok_and(|held| (*pending).offset + held == offset);
    if !continues {
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        (*pending).offset = offset;
    }
    (*pending)
        .bytes
        .extend_from_slice(std::slice::from_raw_parts(data as *const u8, length));
    // SQLite writes a WAL header, frame headers and pages, none larger than a page.
    assert!((*pending).bytes.len() <= WAL_WRITE_BUFFER_MAX + PAGE_SIZE_MAX);
    if (*pending).bytes.len() >= WAL_WRITE_BUFFER_MAX {
        return flush(file);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    let flushed = flush(file);
    let wal = file as *mut WalFile;
    drop(Box::from_raw((*wal).pending));
    (*wal).pending = std::ptr::null_mut();
    let closed = match inner_methods(file).xClose {
        Some(method) => method(inner_file(file)),
        None => ffi::SQLITE_OK,
    };
    (*wal).base.pMethods = std::ptr::null();
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

/// Defines a method that writes what is held back, then passes the call on.
macro_rules! flush_then {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            match inner_methods(file).$method {
                Some(method) => method(inner_file(file), $($arg),*),
                None => ffi::SQLITE_IOERR,
            }
        }
    };
}

/// Defines a method that passes the call on as it is.
macro_rules! pass {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty, $missing:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> $ret {
            match inner_methods(file).$method {
                Some(method) => method(inner_file(file), $($arg),*),
                None => $missing,
            }
        }
    };
}

flush_then!(read, xRead, (data: *mut c_void, amount: c_int, offset: i64));
flush_then!(truncate, xTruncate, (size: i64));
unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let rc = flush(file);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    let Some(method) = inner_methods(file).xSync else {
        return ffi::SQLITE_IOERR_FSYNC;
    };
    let started = Instant::now();
    let rc = method(inner_file(file), flags);
    let elapsed = started.elapsed();
    SYNC_HISTOGRAM.with(|current| {
        if let Some(histogram) = &*current.borrow() {
            histogram.record(elapsed);
        }
    });
    rc
}

flush_then!(file_size, xFileSize, (size: *mut i64));
flush_then!(file_control, xFileControl, (op: c_int, arg: *mut c_void));
flush_then!(fetch, xFetch, (offset: i64, amount: c_int, pointer: *mut *mut c_void));
pass!(lock, xLock, (level: c_int) -> c_int, ffi::SQLITE_OK);
pass!(unlock, xUnlock, (level: c_int) -> c_int, ffi::SQLITE_OK);
pass!(check_reserved_lock, xCheckReservedLock, (out: *mut c_int) -> c_int, ffi::SQLITE_OK);
pass!(sector_size, xSectorSize, () -> c_int, 4096);
pass!(device_characteristics, xDeviceCharacteristics, () -> c_int, 0);
pass!(shm_map, xShmMap, (page: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int, ffi::SQLITE_IOERR);
pass!(shm_lock, xShmLock, (offset: c_int, count: c_int, flags: c_int) -> c_int, ffi::SQLITE_IOERR);
pass!(shm_unmap, xShmUnmap, (delete: c_int) -> c_int, ffi::SQLITE_OK);
pass!(unfetch, xUnfetch, (offset: i64, pointer: *mut c_void) -> c_int, ffi::SQLITE_OK);

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    if let Some(method) = inner_methods(file).xShmBarrier {
        method(inner_file(file))
    }
}
