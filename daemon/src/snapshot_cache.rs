//! Snapshots already read, and their rows as a stack's pipeline encoded
//! them, kept for the next stack that reads the same columns of the same
//! snapshot (issue 17, "reuse across iterations"): a selection's later
//! stacks and rounds, derived models and reproductions over one snapshot
//! skip its COPY, and those whose pipeline and split are the same skip the
//! fit and the encoding too. A frozen snapshot never changes, so an entry
//! is never stale; when the memory budget (`snapshot_cache_mib`) is full,
//! the least recently used entries go first.
//!
//! Entries are whole reads (a snapshot's columns as one request read them,
//! in its key order), never assembled from several: a snapshot without a
//! key is read in the table's physical order, which two reads need not
//! share (synchronized scans), so columns of two reads cannot be mixed.
//!
//! The LRU is a short vector by hand: a cache holds a handful of tables and
//! is bounded by their bytes, which the LRU crates (bounded by an entry
//! count) do not track.

use std::any::Any;
use std::sync::{Arc, Mutex};

use cerebro_shared::batch::ColumnData;

use crate::catalog::JobSpec;
use crate::data::{snapshot_read, ReadAs, Table};

/// What a read of a snapshot is: which snapshot (its id and creation time,
/// so that a catalog made again, whose ids start over, never hits an entry
/// of the one before), and which columns as what, in what order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotKey {
    pub snapshot_id: i64,
    pub created_micros: i64,
    pub relation: String,
    pub columns: Vec<(String, ReadAs)>,
    pub order_by: Option<String>,
}

impl SnapshotKey {
    /// The read [`crate::data::read_snapshot`] makes for `job`.
    pub fn of(job: &JobSpec) -> SnapshotKey {
        SnapshotKey {
            snapshot_id: job.snapshot_id,
            created_micros: job.snapshot_created_micros,
            relation: job.data_relation.clone(),
            columns: snapshot_read(job).into_iter().map(|c| (c.name, c.read_as)).collect(),
            order_by: job.snapshot_columns.key.clone(),
        }
    }
}

/// What the cache holds and how it served, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// A read, or what `encoding` (a description of a pipeline and split, the
/// trainer's) made of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EntryKey {
    read: SnapshotKey,
    encoding: Option<String>,
}

struct Entry {
    key: EntryKey,
    value: Arc<dyn Any + Send + Sync>,
    bytes: usize,
}

#[derive(Default)]
struct State {
    /// Least recently used first.
    entries: Vec<Entry>,
    stats: CacheStats,
}

pub struct SnapshotCache {
    budget: usize,
    state: Mutex<State>,
}

impl SnapshotCache {
    /// A cache of at most `budget` bytes of tables; 0 keeps nothing.
    pub fn new(budget: usize) -> SnapshotCache {
        SnapshotCache { budget, state: Mutex::new(State::default()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table `key` read, if kept (it becomes the most recently used),
    /// with its size in bytes.
    pub fn get(&self, key: &SnapshotKey) -> Option<(Arc<Table>, usize)> {
        self.find(&EntryKey { read: key.clone(), encoding: None })
    }

    /// Keeps `table` as what `key` reads, evicting the least recently used
    /// entries until it fits; a table larger than the whole budget is not
    /// kept. Returns whether it was.
    pub fn insert(&self, key: SnapshotKey, table: Arc<Table>) -> bool {
        let bytes = table_bytes(&table);
        self.keep(EntryKey { read: key, encoding: None }, table, bytes)
    }

    /// What `encoding` made of the rows `key` reads, if kept.
    pub fn get_encoded<T: Any + Send + Sync>(&self, key: &SnapshotKey, encoding: &str) -> Option<(Arc<T>, usize)> {
        self.find(&EntryKey { read: key.clone(), encoding: Some(encoding.to_owned()) })
    }

    /// Keeps `value`, `bytes` large, as what `encoding` made of the rows
    /// `key` reads ([`SnapshotCache::insert`]'s rules).
    pub fn insert_encoded<T: Any + Send + Sync>(
        &self,
        key: SnapshotKey,
        encoding: String,
        value: Arc<T>,
        bytes: usize,
    ) -> bool {
        self.keep(EntryKey { read: key, encoding: Some(encoding) }, value, bytes)
    }

    fn find<T: Any + Send + Sync>(&self, key: &EntryKey) -> Option<(Arc<T>, usize)> {
        let mut state = self.state();
        let found = state.entries.iter().position(|e| &e.key == key).and_then(|at| {
            let entry = state.entries.remove(at);
            let found = entry.value.clone().downcast::<T>().ok().map(|v| (v, entry.bytes));
            state.entries.push(entry);
            found
        });
        match found {
            Some(found) => {
                state.stats.hits += 1;
                Some(found)
            }
            None => {
                state.stats.misses += 1;
                None
            }
        }
    }

    fn keep(&self, key: EntryKey, value: Arc<dyn Any + Send + Sync>, bytes: usize) -> bool {
        if bytes > self.budget {
            return false;
        }
        let mut state = self.state();
        state.entries.retain(|e| e.key != key);
        let mut held: usize = state.entries.iter().map(|e| e.bytes).sum();
        while held + bytes > self.budget {
            let evicted = state.entries.remove(0);
            held -= evicted.bytes;
            state.stats.evictions += 1;
        }
        state.entries.push(Entry { key, value, bytes });
        true
    }

    pub fn stats(&self) -> CacheStats {
        let state = self.state();
        CacheStats { entries: state.entries.len(), bytes: state.entries.iter().map(|e| e.bytes).sum(), ..state.stats }
    }
}

/// About what a table takes in memory: 16 bytes a number, and each text's
/// bytes plus its `String`'s 24 (and the `Option` around them).
pub fn table_bytes(table: &Table) -> usize {
    table
        .columns
        .iter()
        .map(|c| match c {
            ColumnData::Float64(v) => v.len() * std::mem::size_of::<Option<f64>>(),
            ColumnData::Text(v) => {
                v.len() * std::mem::size_of::<Option<String>>() + v.iter().flatten().map(String::len).sum::<usize>()
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(snapshot_id: i64, columns: &[&str]) -> SnapshotKey {
        SnapshotKey {
            snapshot_id,
            created_micros: 1,
            relation: format!("cerebro_data.snapshot_{snapshot_id}"),
            columns: columns.iter().map(|c| (c.to_string(), ReadAs::Float64)).collect(),
            order_by: None,
        }
    }

    /// A table of one numeric column of `rows` rows: 16 bytes a row.
    fn table(rows: usize) -> Arc<Table> {
        Arc::new(Table { columns: vec![ColumnData::Float64(vec![Some(1.0); rows])], fingerprint: "f".into() })
    }

    #[test]
    fn a_read_is_served_again_only_for_the_same_snapshot_and_columns() {
        let cache = SnapshotCache::new(1 << 20);
        assert!(cache.get(&key(1, &["a", "y"])).is_none());
        assert!(cache.insert(key(1, &["a", "y"]), table(100)));
        let (found, bytes) = cache.get(&key(1, &["a", "y"])).expect("kept");
        assert_eq!((found.columns[0].len(), bytes), (100, 1600));
        assert!(cache.get(&key(1, &["a", "b", "y"])).is_none(), "other columns are another read");
        assert!(cache.get(&key(2, &["a", "y"])).is_none(), "another snapshot");
        let mut again = key(1, &["a", "y"]);
        again.created_micros = 2;
        assert!(cache.get(&again).is_none(), "a snapshot made again under the same id");
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes, stats.hits, stats.misses), (1, 1600, 1, 4));
    }

    #[test]
    fn the_least_recently_used_read_goes_first_when_the_budget_is_full() {
        // Room for two tables of 1,600 bytes, not three.
        let cache = SnapshotCache::new(4000);
        assert!(cache.insert(key(1, &["a"]), table(100)));
        assert!(cache.insert(key(2, &["a"]), table(100)));
        assert!(cache.get(&key(1, &["a"])).is_some(), "1 is now the most recently used");
        assert!(cache.insert(key(3, &["a"]), table(100)));
        assert!(cache.get(&key(2, &["a"])).is_none(), "2 was evicted");
        assert!(cache.get(&key(1, &["a"])).is_some() && cache.get(&key(3, &["a"])).is_some());
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes, stats.evictions), (2, 3200, 1));
        // A table larger than the budget is not kept, and evicts nothing.
        assert!(!cache.insert(key(4, &["a"]), table(1000)));
        assert_eq!(cache.stats().entries, 2);
        // Encodings count against the same budget: this one evicts 1.
        assert!(cache.insert_encoded(key(3, &["a"]), "e".into(), Arc::new(0u8), 900));
        assert!(cache.get(&key(1, &["a"])).is_none(), "1 was evicted for the encoding");
        assert!(cache.get(&key(3, &["a"])).is_some());
        // What a pipeline made of a read is kept beside it, by its description.
        assert!(cache.insert_encoded(key(1, &["a"]), "ple, seed 1".into(), Arc::new(vec![1.0f32; 10]), 40));
        assert_eq!(
            cache.get_encoded::<Vec<f32>>(&key(1, &["a"]), "ple, seed 1").map(|(v, b)| (v.len(), b)),
            Some((10, 40))
        );
        assert!(cache.get_encoded::<Vec<f32>>(&key(1, &["a"]), "ple, seed 2").is_none(), "another split");
        assert!(cache.get_encoded::<Vec<u8>>(&key(1, &["a"]), "ple, seed 1").is_none(), "another type");
        // Nothing is kept with no budget.
        let none = SnapshotCache::new(0);
        assert!(!none.insert(key(1, &["a"]), table(1)));
        assert!(none.get(&key(1, &["a"])).is_none());
    }
}
