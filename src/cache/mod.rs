//! In-process caches, one kind for every module: bounded in entries, with a time to live, safe to
//! share between threads, and evicting by use (TinyLFU) rather than clearing when full.
//!
//! What each module caches — resolved credentials, OAuth client records, verified tokens, tier
//! limits, unknown secrets — is dropped on every instance through [`invalidation`].

pub mod invalidation;

use std::{hash::Hash, time::Duration};

/// A bounded TTL cache. A zero TTL (configuration that turns caching off) keeps nothing.
pub struct Cache<K, V> {
    inner: Option<moka::sync::Cache<K, V>>,
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(max_entries: u64, ttl: Duration) -> Self {
        let inner = (!ttl.is_zero() && max_entries > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build()
        });
        Self { inner }
    }

    /// Whether anything is kept (a zero size or TTL keeps nothing).
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.inner.as_ref()?.get(key)
    }

    /// The entry for `key`, made by `make` when there is none; concurrent callers for one key get
    /// the same value (`make` runs once). Without caching, each call makes a fresh one.
    pub fn get_or_insert_with(&self, key: K, make: impl FnOnce() -> V) -> V {
        match &self.inner {
            Some(c) => c.get_with(key, make),
            None => make(),
        }
    }

    pub fn insert(&self, key: K, value: V) {
        if let Some(c) = &self.inner {
            c.insert(key, value);
        }
    }

    pub fn remove<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(c) = &self.inner {
            c.invalidate(key);
        }
    }

    /// Drops every entry for which `drop` holds (entries added afterwards are kept).
    pub fn remove_if(&self, drop: impl Fn(&K, &V) -> bool + Send + Sync + 'static) {
        if let Some(c) = &self.inner
            && c.invalidate_entries_if(drop).is_err()
        {
            // Only possible without `support_invalidation_closures`, which `new` always sets.
            c.invalidate_all();
        }
    }

    pub fn clear(&self) {
        if let Some(c) = &self.inner {
            c.invalidate_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_are_bounded_and_can_be_dropped_by_predicate() {
        let c: Cache<u32, u32> = Cache::new(100, Duration::from_millis(50));
        c.insert(1, 10);
        c.insert(2, 20);
        assert_eq!(c.get(&1), Some(10));
        c.remove_if(|_, v| *v == 20);
        assert_eq!(c.get(&2), None);
        assert_eq!(c.get(&1), Some(10));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(c.get(&1), None);

        let small: Cache<u32, u32> = Cache::new(10, Duration::from_secs(60));
        for i in 0..1000 {
            small.insert(i, i);
        }
        let kept = (0..1000).filter(|i| small.get(i).is_some()).count();
        assert!(kept <= 20, "a cache of 10 keeps about 10 entries, kept {kept}");
        assert!(kept > 0, "a full cache still keeps entries, instead of clearing everything");

        let off: Cache<u32, u32> = Cache::new(10, Duration::ZERO);
        off.insert(1, 1);
        assert_eq!(off.get(&1), None);
    }
}
