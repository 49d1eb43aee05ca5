//! In-process caches, one kind for every module: bounded in entries, with a time to live, safe to
//! share between threads, and evicting by use (CLOCK) rather than clearing when full.
//!
//! What each module caches — resolved credentials, OAuth client records, verified tokens, tier
//! limits, unknown secrets — is dropped on every instance through [`invalidation`].

pub mod invalidation;

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, Hash},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// Keyed per cache with a random seed (the hash hashbrown uses by default): these maps sit on
/// every request's path, and SipHash was a visible share of it.
type RandomState = foldhash::fast::RandomState;

/// A bounded TTL cache. A zero TTL (configuration that turns caching off) keeps nothing.
///
/// Entries live in shards, each a hash map behind its own mutex, so that a read is one hash, one
/// uncontended lock and one clone: these caches sit on every request's path. A full shard evicts
/// by use with the CLOCK algorithm (an entry read since the hand last passed gets a second
/// chance), so that a full cache keeps its hot entries instead of clearing. An entry lives
/// `ttl` from its insertion (reads do not extend it).
pub struct Cache<K, V> {
    inner: Option<Shards<K, V>>,
}

struct Shards<K, V> {
    hasher: RandomState,
    shards: Box<[Mutex<Shard<K, V>>]>,
    mask: usize,
    ttl: Duration,
}

struct Slot<V> {
    value: V,
    expires: Instant,
    used: bool,
}

struct Shard<K, V> {
    map: HashMap<K, Slot<V>, RandomState>,
    /// The CLOCK's ring: each key once per insertion (keys removed since are skipped when the
    /// hand reaches them, and compacted away when they pile up).
    ring: VecDeque<K>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V> Shard<K, V> {
    /// Makes room for one more entry; false when there was nothing to evict.
    fn evict_one(&mut self, now: Instant) -> bool {
        // Each entry is passed at most twice (once to clear its mark), plus the stale keys.
        let mut budget = 2 * self.ring.len() + 1;
        while let Some(key) = self.ring.pop_front() {
            budget -= 1;
            match self.map.get_mut(&key) {
                None => continue,
                Some(slot) if slot.used && slot.expires > now && budget > 0 => {
                    slot.used = false;
                    self.ring.push_back(key);
                }
                Some(_) => {
                    self.map.remove(&key);
                    return true;
                }
            }
        }
        false
    }

    fn insert(&mut self, key: K, value: V, expires: Instant, now: Instant) {
        if let Some(slot) = self.map.get_mut(&key) {
            *slot = Slot { value, expires, used: false };
            return;
        }
        while self.map.len() >= self.capacity && self.evict_one(now) {}
        if self.ring.len() > 2 * self.map.len() + 16 {
            let map = &self.map;
            self.ring.retain(|k| map.contains_key(k));
        }
        self.ring.push_back(key.clone());
        self.map.insert(key, Slot { value, expires, used: false });
    }
}

impl<K, V> Shards<K, V>
where
    K: Hash + Eq,
{
    fn shard<Q>(&self, key: &Q) -> MutexGuard<'_, Shard<K, V>>
    where
        Q: Hash + ?Sized,
    {
        let i = (self.hasher.hash_one(key) as usize) & self.mask;
        // A panic while holding a shard leaves a consistent map (no operation panics midway).
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(max_entries: u64, ttl: Duration) -> Self {
        let inner = (!ttl.is_zero() && max_entries > 0).then(|| {
            let max = usize::try_from(max_entries).unwrap_or(usize::MAX);
            // Enough shards to keep locks uncontended, few enough that each holds a useful share.
            let shards = (max / 64).clamp(1, 64).next_power_of_two().min(64);
            let capacity = max.div_ceil(shards);
            let hasher = RandomState::default();
            Shards {
                shards: (0..shards)
                    .map(|_| {
                        Mutex::new(Shard { map: HashMap::with_hasher(hasher.clone()), ring: VecDeque::new(), capacity })
                    })
                    .collect(),
                hasher,
                mask: shards - 1,
                ttl,
            }
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
        let inner = self.inner.as_ref()?;
        let mut shard = inner.shard(key);
        let slot = shard.map.get_mut(key)?;
        if slot.expires <= Instant::now() {
            shard.map.remove(key);
            return None;
        }
        slot.used = true;
        Some(slot.value.clone())
    }

    /// The entry for `key`, made by `make` when there is none; concurrent callers for one key get
    /// the same value (`make` runs once, under the shard's lock: it must not use this cache).
    /// Without caching, each call makes a fresh one.
    pub fn get_or_insert_with(&self, key: K, make: impl FnOnce() -> V) -> V {
        let Some(inner) = &self.inner else { return make() };
        let mut shard = inner.shard(&key);
        let now = Instant::now();
        if let Some(slot) = shard.map.get_mut(&key)
            && slot.expires > now
        {
            slot.used = true;
            return slot.value.clone();
        }
        let value = make();
        shard.insert(key, value.clone(), now + inner.ttl, now);
        value
    }

    pub fn insert(&self, key: K, value: V) {
        if let Some(inner) = &self.inner {
            let now = Instant::now();
            inner.shard(&key).insert(key, value, now + inner.ttl, now);
        }
    }

    pub fn remove<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(inner) = &self.inner {
            inner.shard(key).map.remove(key);
        }
    }

    /// Drops every entry for which `drop` holds (entries added afterwards are kept).
    pub fn remove_if(&self, drop: impl Fn(&K, &V) -> bool + Send + Sync + 'static) {
        if let Some(inner) = &self.inner {
            for shard in inner.shards.iter() {
                shard.lock().unwrap_or_else(|e| e.into_inner()).map.retain(|k, s| !drop(k, &s.value));
            }
        }
    }

    pub fn clear(&self) {
        if let Some(inner) = &self.inner {
            for shard in inner.shards.iter() {
                let mut s = shard.lock().unwrap_or_else(|e| e.into_inner());
                s.map.clear();
                s.ring.clear();
            }
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

    #[test]
    fn a_full_cache_keeps_the_entries_in_use() {
        let c: Cache<u32, u32> = Cache::new(100, Duration::from_secs(60));
        for i in 0..100 {
            c.insert(i, i);
        }
        // 0..10 are read between waves of one-off entries: they stay.
        for wave in 0..20 {
            for i in 0..10 {
                assert_eq!(c.get(&i), Some(i), "hot entry {i} evicted in wave {wave}");
            }
            for j in 0..30 {
                c.insert(1000 + wave * 30 + j, 0);
            }
        }
        let kept = (0..2000).filter(|i| c.get(i).is_some()).count();
        assert!(kept <= 100, "bounded: {kept}");
    }

    #[test]
    fn removals_and_reinsertions_do_not_grow_it_and_make_runs_once_per_key() {
        let c: Cache<u32, u32> = Cache::new(10, Duration::from_secs(60));
        for round in 0..10_000 {
            c.insert(round % 5, round);
            c.remove(&(round % 5));
        }
        let inner = c.inner.as_ref().unwrap();
        let ring: usize = inner.shards.iter().map(|s| s.lock().unwrap().ring.len()).sum();
        assert!(ring <= 2 * 10 + 16 + 1, "the ring grew to {ring}");
        let mut made = 0;
        for _ in 0..5 {
            assert_eq!(
                c.get_or_insert_with(7, || {
                    made += 1;
                    70
                }),
                70
            );
        }
        assert_eq!(made, 1);
        c.clear();
        assert_eq!(c.get(&7), None);
    }
}
