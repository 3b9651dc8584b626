//! Parsed definitions, cached by (name, version).
//!
//! Versions never change once stored, so a cached entry is never stale. The latest
//! version of a name is cached only when this process is the store's only writer:
//! every deploy then goes through [`Definitions::insert`]. In a cluster another node
//! may deploy at any time, so "the latest" is read from the store each time.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use weir_model::Definition;
use weir_store::Store;

use crate::Error;

pub(crate) struct Definitions {
    store: Arc<dyn Store>,
    parsed: RwLock<HashMap<(String, u32), Arc<Definition>>>,
    /// The latest version of each name, kept only for a single-writer store.
    latest: Option<RwLock<HashMap<String, u32>>>,
}

impl Definitions {
    pub fn new(store: Arc<dyn Store>) -> Definitions {
        let latest = store.single_writer().then(|| RwLock::new(HashMap::new()));
        Definitions {
            store,
            parsed: RwLock::new(HashMap::new()),
            latest,
        }
    }

    /// A definition version, parsed once.
    pub async fn get(&self, name: &str, version: u32) -> Result<Arc<Definition>, Error> {
        if let Some(found) = self.cached(name, version) {
            return Ok(found);
        }
        let (_, found) = self.resolve(name, Some(version)).await?;
        Ok(found)
    }

    /// A definition version (the latest when `None`), with its version number.
    pub async fn resolve(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<(u32, Arc<Definition>), Error> {
        let known = version.or_else(|| self.latest_known(name));
        if let Some(version) = known {
            if let Some(found) = self.cached(name, version) {
                return Ok((version, found));
            }
        }
        let store = self.store.clone();
        let owned_name = name.to_string();
        let record = tokio::task::spawn_blocking(move || store.definition(&owned_name, version))
            .await
            .map_err(|err| Error::Unavailable(err.to_string()))??;
        let Some(record) = record else {
            return Err(Error::NotFound(match version {
                Some(version) => format!("definition {name} version {version} does not exist"),
                None => format!("definition {name} does not exist"),
            }));
        };
        if version.is_none() {
            self.note_latest(name, record.version);
        }
        if let Some(found) = self.cached(name, record.version) {
            return Ok((record.version, found));
        }
        let definition = weir_model::dsl::parse(&record.source).map_err(|problems| {
            Error::Corrupt(format!(
                "stored definition {name} version {} no longer parses: {}",
                record.version,
                problems
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ))
        })?;
        let definition = Arc::new(definition);
        self.parsed
            .write()
            .expect("definitions lock")
            .insert((name.to_string(), record.version), definition.clone());
        Ok((record.version, definition))
    }

    /// Remembers a definition just deployed.
    pub fn insert(&self, version: u32, definition: Arc<Definition>) {
        self.note_latest(&definition.name, version);
        self.parsed
            .write()
            .expect("definitions lock")
            .insert((definition.name.clone(), version), definition);
    }

    fn latest_known(&self, name: &str) -> Option<u32> {
        let latest = self.latest.as_ref()?;
        latest.read().expect("definitions lock").get(name).copied()
    }

    /// Records `version` as the latest of `name` unless a later one is known (a read
    /// that started before a deploy may finish after it).
    fn note_latest(&self, name: &str, version: u32) {
        if let Some(latest) = &self.latest {
            let mut latest = latest.write().expect("definitions lock");
            let entry = latest.entry(name.to_string()).or_insert(version);
            *entry = (*entry).max(version);
        }
    }

    fn cached(&self, name: &str, version: u32) -> Option<Arc<Definition>> {
        self.parsed
            .read()
            .expect("definitions lock")
            .get(&(name.to_string(), version))
            .cloned()
    }
}
