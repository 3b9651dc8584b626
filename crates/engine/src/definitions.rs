//! Parsed definitions, cached by (name, version).
//!
//! Versions never change once stored, so a cached entry is never stale.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use weir_model::Definition;
use weir_store::Store;

use crate::Error;

pub(crate) struct Definitions {
    store: Arc<dyn Store>,
    parsed: RwLock<HashMap<(String, u32), Arc<Definition>>>,
}

impl Definitions {
    pub fn new(store: Arc<dyn Store>) -> Definitions {
        Definitions {
            store,
            parsed: RwLock::new(HashMap::new()),
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
        if let Some(version) = version {
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
        self.parsed
            .write()
            .expect("definitions lock")
            .insert((definition.name.clone(), version), definition);
    }

    fn cached(&self, name: &str, version: u32) -> Option<Arc<Definition>> {
        self.parsed
            .read()
            .expect("definitions lock")
            .get(&(name.to_string(), version))
            .cloned()
    }
}
