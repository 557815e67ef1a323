//! The SQLite store: opening the file with the configured durability, applying
//! `migrations/`, the batching writer ([`writer`]) and the read side ([`devices`]).
//!
//! The writer owns one connection of its own and is the only task that writes readings;
//! everything else (Hello look-ups, device administration) uses a separate small pool, so a
//! slow query never stalls ingest. The schema interns device and sensor names into integer
//! keys; users read the `telemetry` and `events` views.

pub mod batch;
pub mod checkpoint;
pub mod commands;
pub mod devices;
pub mod outbox;
pub mod query;
pub mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::ConnectOptions;

use crate::config::Durability;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// SQLite refused an operation.
    #[error("sqlite: {0}")]
    Sqlite(#[from] sqlx::Error),
    /// SQLite refused an operation on the writer's connection.
    #[error("sqlite: {0}")]
    Rusqlite(#[from] rusqlite::Error),
    /// A frame could not be re-encoded for the outbox.
    #[error("encoding a frame for the outbox: {0}")]
    Encode(String),
    /// The file is not a sound SQLite database: the gateway refuses to write to it.
    #[error(
        "the store {} is damaged ({detail}); the gateway will not write to it. Stop here, keep a copy \
         of the file (with its -wal), and salvage what it holds: \
         `sqlite3 {} .recover | sqlite3 recovered.db`, then point store.path at recovered.db \
         (README, \"A damaged store\")",
        path.display(),
        path.display()
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        detail: String,
    },
    /// The file's migrations do not match this gateway's.
    #[error(
        "the store {} cannot be brought to this gateway's schema ({source}); nothing was changed \
         by the failed step (each migration is one transaction). If a newer gateway wrote it, \
         run that version or restore a backup (README, \"A damaged store\")",
        path.display()
    )]
    Schema {
        /// The file.
        path: PathBuf,
        /// What sqlx said.
        source: sqlx::migrate::MigrateError,
    },
    /// The open lock file could not be taken.
    #[error("locking {path} to open the store: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl StoreError {
    /// SQLite said the disk (or `max_page_count`, from `store.max_bytes`) is full.
    pub fn is_full(&self) -> bool {
        let code = match self {
            StoreError::Rusqlite(rusqlite::Error::SqliteFailure(e, _)) => e.extended_code,
            StoreError::Sqlite(e) => match sqlite_code(e) {
                Some(code) => code,
                None => return false,
            },
            _ => return false,
        };
        code & 0xff == rusqlite::ffi::SQLITE_FULL
    }
}

/// An opened store: a pool for reads and administration; the writer opens a connection of
/// its own ([`Store::writer_connection`]).
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
    durability: Durability,
    options: SqliteConnectOptions,
}

/// Page cache, mmap and checkpoint settings of every connection, as (pragma, value).
/// Inserts spread over every (device, sensor) series touch many leaf pages per commit: keep
/// them cached instead of re-reading them, and read through mmap. No connection checkpoints
/// inside its commits: [`checkpoint`] does it on a thread of its own, so no ack waits for a
/// checkpoint's fsyncs.
pub const PRAGMAS: &[(&str, &str)] = &[
    ("cache_size", "-65536"),
    ("mmap_size", "268435456"),
    ("wal_autocheckpoint", "0"),
];

/// [`PRAGMAS`] as SQL, with WAL on.
pub static STORE_PRAGMAS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let mut sql = String::from("PRAGMA journal_mode = WAL;");
    for (name, value) in PRAGMAS {
        sql.push_str(&format!(" PRAGMA {name} = {value};"));
    }
    sql
});

/// How long a connection waits for SQLite's locks before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Milliseconds since the Unix epoch, by the gateway's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn connect_options(
    path: &Path,
    durability: Durability,
) -> Result<SqliteConnectOptions, StoreError> {
    let synchronous = match durability {
        Durability::ProcessCrash => SqliteSynchronous::Normal,
        Durability::PowerLoss => SqliteSynchronous::Full,
    };
    let options = SqliteConnectOptions::from_str("sqlite:")?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(false)
        // Per-statement logging would be per batch at info level; keep it out of the way.
        .log_statements(tracing::log::LevelFilter::Trace);
    Ok(PRAGMAS
        .iter()
        .fold(options, |o, (name, value)| o.pragma(*name, *value)))
}

impl Store {
    /// Opens (creating if missing) the SQLite file at `path`, checks it, and applies the
    /// migrations.
    pub async fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        Self::open_checked(path, durability, true).await
    }

    /// [`Store::open`], with `PRAGMA quick_check` at open only if `check`
    /// (`store.check_at_start`).
    pub async fn open_checked(
        path: &Path,
        durability: Durability,
        check: bool,
    ) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let options = connect_options(path, durability)?;
        let lock = lock_for_open(path).await?;
        let damaged = |detail: String| StoreError::Damaged {
            path: path.to_path_buf(),
            detail,
        };
        // Checked before anything can write to it (switching to WAL rewrites the header, a
        // checkpoint rewrites pages): read-only.
        let checked = if !check {
            true
        } else if path.exists() {
            let read_only = SqliteConnectOptions::new().filename(path).read_only(true);
            match SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(read_only)
                .await
            {
                Ok(pool) => {
                    let checked = check_integrity(&pool).await;
                    pool.close().await;
                    checked.map_err(damaged)?;
                    true
                }
                Err(e) => match corruption(&e) {
                    Some(detail) => return Err(damaged(detail)),
                    // Cannot be opened read-only (e.g. its -shm is not writable by us):
                    // checked below instead.
                    None => false,
                },
            }
        } else {
            true // a new store
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await
            .map_err(|e| match corruption(&e) {
                Some(detail) => damaged(detail),
                None => StoreError::Sqlite(e),
            })?;
        if !checked {
            check_integrity(&pool).await.map_err(damaged)?;
        }
        let migrator = sqlx::migrate!("../migrations");
        announce_migrations(&pool, &migrator).await;
        migrator
            .run(&pool)
            .await
            .map_err(|source| StoreError::Schema {
                path: path.to_path_buf(),
                source,
            })?;
        drop(lock); // released: others may open the file now
        Ok(Self {
            pool,
            path: path.to_path_buf(),
            durability,
            options,
        })
    }

    /// The pool for reads and administration.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A separate pool of `max` connections for a background reader that may issue many
    /// queries at once (the detector's warm-up), so it never starves Hello look-ups and
    /// the API of the shared pool. Connections open lazily.
    pub fn side_pool(&self, max: u32) -> SqlitePool {
        SqlitePoolOptions::new()
            .max_connections(max)
            .connect_lazy_with(self.options.clone())
    }

    /// Starts the WAL checkpointer on a connection of its own.
    pub fn checkpointer(
        &self,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Result<checkpoint::Checkpointer, StoreError> {
        checkpoint::Checkpointer::start(&self.path, self.durability, metrics)
    }

    /// A connection of its own for the store writer.
    pub fn writer_connection(&self) -> Result<rusqlite::Connection, StoreError> {
        batch::open_connection(&self.path, self.durability)
    }
}

/// `PRAGMA quick_check` (the b-trees, not the index contents): `Err` with SQLite's first
/// findings when the file is damaged. It reads the whole file once: about a second per GiB
/// here, paid at start only.
async fn check_integrity(pool: &SqlitePool) -> Result<(), String> {
    let rows: Vec<String> = match sqlx::query_scalar("PRAGMA quick_check(5)")
        .fetch_all(pool)
        .await
    {
        Ok(rows) => rows,
        Err(e) => return Err(corruption(&e).unwrap_or_else(|| e.to_string())),
    };
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(())
    } else {
        Err(format!("PRAGMA quick_check: {}", rows.join("; ")))
    }
}

/// SQLite's own words when `e` says the file is not a database or is corrupt.
fn corruption(e: &sqlx::Error) -> Option<String> {
    // SQLITE_CORRUPT and SQLITE_NOTADB, with or without extended bits.
    let code = sqlite_code(e)? & 0xff;
    (code == rusqlite::ffi::SQLITE_CORRUPT || code == rusqlite::ffi::SQLITE_NOTADB)
        .then(|| e.as_database_error().map(|d| d.message().to_owned()))
        .flatten()
}

/// The SQLite result code (with its extended bits) of an sqlx error, if SQLite gave one.
fn sqlite_code(e: &sqlx::Error) -> Option<i32> {
    e.as_database_error()?.code()?.parse().ok()
}

/// Logs the migrations an existing store is about to get (one line): some rewrite a table,
/// which takes a while on a big store, and the operator should know why start is slow.
async fn announce_migrations(pool: &SqlitePool, migrator: &sqlx::migrate::Migrator) {
    let applied: Result<Vec<(i64,)>, _> =
        sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await;
    let Ok(applied) = applied else {
        return; // a new store: nothing to announce
    };
    let pending: Vec<&str> = migrator
        .iter()
        .filter(|m| !applied.iter().any(|(v,)| *v == m.version))
        .map(|m| m.description.as_ref())
        .collect();
    if !pending.is_empty() {
        tracing::info!(
            migrations = %pending.join("; "),
            "upgrading the store; on a big store this can take minutes, do not stop the gateway"
        );
    }
}

/// Holds an exclusive lock on `<db>.lock` while a store is opened: creating the file,
/// switching it to WAL (which needs SQLite's exclusive lock and can fail at once with
/// SQLITE_BUSY) and applying `migrations/` (sqlx does not lock SQLite migrations). Two
/// processes opening one file at once (the gateway starting while `gateway devices add` runs)
/// then take turns instead of failing.
async fn lock_for_open(db: &Path) -> Result<std::fs::File, StoreError> {
    let mut lock_path = db.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let lock_err = |source| StoreError::Lock {
        path: lock_path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(lock_err)?;
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(|e| lock_err(std::io::Error::other(e)))?
        .map_err(lock_err)
}

/// `store.max_bytes`: caps the database file at `max` bytes through `max_page_count` on the
/// writer's connection (the one that grows it). A store already bigger is full at once.
pub fn limit_size(conn: &rusqlite::Connection, max: u64) -> Result<(), StoreError> {
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let pages = (max / page.max(512) as u64).max(1) as i64;
    let set: i64 = conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
        r.get(0)
    })?;
    if set > pages {
        tracing::warn!(
            max_bytes = max,
            size_bytes = set * page,
            "the store is already bigger than store.max_bytes: it takes nothing more until it shrinks or the limit rises"
        );
    }
    Ok(())
}

/// A u64 from the wire as the SQLite integer with the same bits.
pub fn u64_to_sql(v: u64) -> i64 {
    v as i64
}

/// The inverse of [`u64_to_sql`].
pub fn u64_from_sql(v: i64) -> u64 {
    v as u64
}
