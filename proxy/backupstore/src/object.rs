//! The driver of the object-store targets (s3, azblob): the backupstore's files as objects
//! under a prefix, through Apache Arrow's `object_store`. Requests run on the tokio runtime the
//! target was opened on (lhnet's own; a simulator pod's), driven by the synchronous [`Driver`]
//! calls, which run on the blocking pool.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::driver::Driver;
use super::endpoints::{excerpt, EndpointPolicy, REFUSED};

/// How much of an error (which quotes the target's answer) goes into lhnet's errors.
const MAX_ERROR_CHARS: usize = 300;
/// Stores kept for reuse (their connection pools), keyed by target and settings.
const CACHED_STORES: usize = 16;

/// An object-store backup target.
#[derive(Debug)]
pub struct ObjectDriver {
    kind: &'static str,
    /// The target's URL as Longhorn's `GetURL()` writes it.
    url: String,
    /// `S3`, `Azure`: how errors name the service.
    service: &'static str,
    store: Arc<dyn ObjectStore>,
    /// The runtime requests run on: the one the target was opened on.
    runtime: tokio::runtime::Handle,
    /// `PATH/` (or empty), before `backupstore/…`.
    prefix: String,
    /// Said after every error (how credentials were found, when that matters).
    note: &'static str,
}

/// The settings of one call, from its `envs`; empty values are unset.
pub fn setting<'a>(credentials: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    credentials
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

impl ObjectDriver {
    /// A driver over the store `build` makes, reused while the same target, settings, policy
    /// and network namespace ask for it. `path` is the prefix as the URL writes it.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        kind: &'static str,
        service: &'static str,
        url: &str,
        credentials: &HashMap<String, String>,
        policy: &EndpointPolicy,
        path: &str,
        note: &'static str,
        build: impl FnOnce() -> Result<Arc<dyn ObjectStore>, String>,
    ) -> Result<ObjectDriver, String> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            format!("backup target {url}: {kind} targets are opened on a tokio runtime (their requests run there)")
        })?;
        // A store's connections belong to the network namespace they were made in (the
        // simulator runs pods as namespaces of one process): one store per namespace.
        let netns = std::fs::read_link("/proc/thread-self/ns/net")
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        let key = {
            let sorted: BTreeMap<_, _> = credentials.iter().collect();
            format!("{url}|{sorted:?}|{policy:?}|{netns}")
        };
        type Stores = Mutex<HashMap<String, Arc<dyn ObjectStore>>>;
        static STORES: OnceLock<Stores> = OnceLock::new();
        let stores = STORES.get_or_init(Default::default);
        let cached = stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let store = match cached {
            Some(s) => s,
            None => {
                let store = build()?;
                let mut map = stores.lock().unwrap_or_else(|p| p.into_inner());
                if map.len() >= CACHED_STORES {
                    map.clear();
                }
                map.insert(key, store.clone());
                store
            }
        };
        let path = path.trim_matches('/');
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        Ok(ObjectDriver {
            kind,
            url: url.to_string(),
            service,
            store,
            runtime,
            prefix,
            note,
        })
    }

    /// The target's URL as Longhorn's `GetURL()` writes it.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, path: &str) -> Path {
        Path::from(format!("{}{}", self.prefix, path.trim_matches('/')))
    }
}

impl ObjectDriver {
    /// Runs `work` on the runtime the target was opened on (lhnet's, or the simulator pod's)
    /// and waits for it. Driver calls run off the async threads (the blocking pool, or threads
    /// of their own), so waiting here stalls no runtime worker.
    fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> io::Result<T> {
        // Handle::block_on panics on an async thread; said as an error instead.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.runtime.block_on(work)
        })) {
            Ok(done) => Ok(done),
            Err(_) => Err(io::Error::other(
                "a backup-target call was made on an async thread of the runtime (lhnet runs driver calls on the blocking pool; this is a bug in lhnet)",
            )),
        }
    }
}

impl ObjectDriver {
    fn io_error(&self, what: &str, path: &Path, e: object_store::Error) -> io::Error {
        if let object_store::Error::NotFound { .. } = e {
            return io::Error::new(io::ErrorKind::NotFound, format!("{path} not found"));
        }
        // The whole chain: a refusal or a limit is said by the innermost error.
        let mut parts = vec![e.to_string()];
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let text = s.to_string();
            if !parts.iter().any(|p| p.contains(&text)) {
                parts.push(text);
            }
            source = s.source();
        }
        // lhnet's own refusal is said whole; anything else quotes the target only in part.
        if let Some(refused) = parts.iter().find(|p| p.contains(REFUSED)) {
            return io::Error::other(format!("{} {what} {path}: {refused}", self.service));
        }
        // The innermost cause first (a refused connection, a limit), then the rest in part.
        let inner = parts.pop().unwrap_or_default();
        let text = match parts.is_empty() {
            true => excerpt(&inner, MAX_ERROR_CHARS),
            false => format!(
                "{} ({})",
                excerpt(&inner, MAX_ERROR_CHARS),
                excerpt(&parts.join(": "), MAX_ERROR_CHARS)
            ),
        };
        io::Error::other(format!(
            "{} {what} {path}: {text}{}",
            self.service, self.note
        ))
    }
}

/// The last segment of an object path.
fn name_of(path: &Path) -> String {
    path.filename().unwrap_or_default().to_string()
}

impl Driver for ObjectDriver {
    fn kind(&self) -> &'static str {
        self.kind
    }

    /// A listing with delimiter `/`: objects and common prefixes alike.
    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let (store, key) = (self.store.clone(), self.key(dir));
        let result = self
            .run(async move { store.list_with_delimiter(Some(&key)).await })?
            .map_err(|e| self.io_error("list", &self.key(dir), e))?;
        let mut names: Vec<String> = result.common_prefixes.iter().map(name_of).collect();
        names.extend(result.objects.iter().map(|o| name_of(&o.location)));
        Ok(names)
    }

    fn walk(&self, dir: &str) -> io::Result<Vec<String>> {
        let (store, key) = (self.store.clone(), self.key(dir));
        let base = key.clone();
        let metas = self
            .run(async move {
                store
                    .list(Some(&key))
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<object_store::Result<Vec<_>>>()
            })?
            .map_err(|e| self.io_error("list", &base, e))?;
        Ok(metas
            .iter()
            .filter_map(|m| {
                m.location
                    .prefix_match(&base)
                    .map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>())
            })
            .map(|parts| parts.join("/"))
            .collect())
    }

    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        let (store, key) = (self.store.clone(), self.key(path));
        self.run(async move {
            match store.get(&key).await {
                Ok(got) => got.bytes().await.map(|b| b.to_vec()),
                Err(e) => Err(e),
            }
        })?
        .map_err(|e| self.io_error("get", &self.key(path), e))
    }

    /// A PUT replaces the object as a whole.
    fn write(&self, path: &str, data: &[u8]) -> io::Result<()> {
        let (store, key) = (self.store.clone(), self.key(path));
        let payload = PutPayload::from(data.to_vec());
        self.run(async move { store.put(&key, payload).await.map(|_| ()) })?
            .map_err(|e| self.io_error("put", &self.key(path), e))
    }

    fn exists(&self, path: &str) -> io::Result<bool> {
        match self.modified(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn modified(&self, path: &str) -> io::Result<SystemTime> {
        let (store, key) = (self.store.clone(), self.key(path));
        self.run(async move { store.head(&key).await })?
            .map(|meta| SystemTime::from(meta.last_modified))
            .map_err(|e| self.io_error("head", &self.key(path), e))
    }

    /// The object itself, then every key under `path/`, one DELETE each (as Longhorn does;
    /// the listing is of `path/`, so removing `vol1` leaves `vol10` alone).
    fn remove(&self, path: &str) -> io::Result<()> {
        let (store, key) = (self.store.clone(), self.key(path));
        let shown = key.clone();
        self.run(async move {
            match store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            let mut under = store.list(Some(&key));
            let mut keys = Vec::new();
            while let Some(meta) = under.next().await {
                keys.push(meta?.location);
            }
            for k in keys {
                match store.delete(&k).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })?
        .map_err(|e| self.io_error("delete", &shown, e))
    }
}
