//! What the engine's integration tests share (the API's tests include it too): the two
//! stores they run on.

use std::sync::Arc;
use std::time::Duration;

use weir_engine::{Config, Engine, TokioClock};
use weir_pgtest::PgServer;
use weir_store::{PostgresStore, SqliteStore, Store};

/// Which store a test runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// What holds a store's data for the length of a test.
pub enum Place {
    /// The SQLite data directory.
    Sqlite { _dir: tempfile::TempDir },
    /// The PostgreSQL server, stopped (and its directory deleted) when dropped.
    Postgres { _server: PgServer },
}

/// Opens a store with `partition_count` partitions on `backend`, in a new place.
pub async fn open_store(backend: Backend, partition_count: u32) -> (Arc<dyn Store>, Place) {
    // Blocking work (initdb, the synchronous PostgreSQL client) runs off the runtime.
    tokio::task::spawn_blocking(move || -> (Arc<dyn Store>, Place) {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let store = SqliteStore::open(dir.path(), partition_count).unwrap();
                (Arc::new(store), Place::Sqlite { _dir: dir })
            }
            Backend::Postgres => {
                let server = PgServer::start();
                let url = server.create_database("weir");
                let store = PostgresStore::connect(&url, partition_count).unwrap();
                (Arc::new(store), Place::Postgres { _server: server })
            }
        }
    })
    .await
    .unwrap()
}

/// An engine on `store` with the default configuration and the wall clock, with
/// `definition` deployed.
#[allow(dead_code)] // not every test binary uses it
pub async fn started_engine(store: Arc<dyn Store>, definition: &str) -> Engine {
    let engine = Engine::start(store, Config::default(), Arc::new(TokioClock::new()))
        .await
        .unwrap();
    engine.deploy(definition).await.unwrap();
    engine
}

/// Waits for each of `ids` to end and checks that it completed.
#[allow(dead_code)] // not every test binary uses it
pub async fn assert_completed(engine: &Engine, ids: &[String]) {
    for id in ids {
        let done = engine
            .wait_instance(id, Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.status, "completed", "{id}");
    }
}

/// Makes `sqlite::<test>` and `postgres::<test>` of each `async fn <test>(Backend)`, each
/// with the test attribute given first.
macro_rules! on_both {
    (#[$attribute:meta] $($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[$attribute]
                async fn $test() {
                    super::$test(super::common::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[$attribute]
                async fn $test() {
                    super::$test(super::common::Backend::Postgres).await;
                }
            )*
        }
    };
}
