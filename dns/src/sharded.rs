//! A hash map split into shards shared between clones: cloning the map copies a vector of shard pointers, and a
//! change copies only the shard it touches, so a patched copy of a zone with a million names costs a few
//! microseconds while the original keeps answering queries.
//!
//! Why not a persistent hash map (a HAMT, as `imbl` has): lookups are the hot path, and a HAMT walks several
//! nodes per lookup and keeps its entries in sparse fixed-size chunks. Measured on 100k service names (release),
//! a HAMT made `Snapshot::answer` about 2.3 times slower than plain `HashMap`s, and its nodes took about 240 bytes
//! per entry of each map; shards cost one extra hash and pointer per lookup and keep the entries as dense as a
//! `HashMap` does.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;

/// Entries per shard on average when the map is built or grown: copying a shard is then a few microseconds.
const TARGET: usize = 64;
/// The shard vector itself is copied by the first change to a clone: past this it would cost more than a shard.
const MAX_SHARDS: usize = 1 << 16;

#[derive(Debug, Clone)]
pub(crate) struct ShardedMap<K, V> {
    shards: Arc<Vec<Arc<HashMap<K, V>>>>,
    /// Picks the shard of a key; shared by every clone, so a key stays in its shard.
    hasher: RandomState,
    len: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> Default for ShardedMap<K, V> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<K: Hash + Eq + Clone, V: Clone> ShardedMap<K, V> {
    /// A map sized for about `expected` entries; it grows past that by doubling its shards.
    pub fn with_capacity(expected: usize) -> Self {
        Self::with_shards(shards_for(expected), RandomState::new())
    }

    fn with_shards(count: usize, hasher: RandomState) -> Self {
        let shards = (0..count).map(|_| Arc::new(HashMap::new())).collect();
        Self { shards: Arc::new(shards), hasher, len: 0 }
    }

    fn index<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        // The shard count is a power of two.
        (self.hasher.hash_one(key) as usize) & (self.shards.len() - 1)
    }

    /// The shard at `i`, copied first if a clone shares it.
    fn shard_mut(&mut self, i: usize) -> &mut HashMap<K, V> {
        Arc::make_mut(&mut Arc::make_mut(&mut self.shards)[i])
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.index(key)].get(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// The value at `key`, for changing in place; copies the key's shard when a clone shares it.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard_holding(key)?.get_mut(key)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.make_room(&key);
        let i = self.index(&key);
        let old = self.shard_mut(i).insert(key, value);
        self.len += usize::from(old.is_none());
        old
    }

    /// The value at `key`, made by `make` first if there is none.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        self.make_room(&key);
        let i = self.index(&key);
        self.len += usize::from(!self.shards[i].contains_key(&key));
        self.shard_mut(i).entry(key).or_insert_with(make)
    }

    /// Doubles the shards before a new key would take the average past twice the target.
    fn make_room(&mut self, key: &K) {
        let full = self.len >= self.shards.len() * TARGET * 2 && self.shards.len() < MAX_SHARDS;
        if full && !self.shards[self.index(key)].contains_key(key) {
            self.grow();
        }
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let old = self.shard_holding(key)?.remove(key);
        self.len -= usize::from(old.is_some());
        old
    }

    /// The shard holding `key`, for changing; `None` (and no copy of a shared shard) when the key is absent.
    fn shard_holding<Q>(&mut self, key: &Q) -> Option<&mut HashMap<K, V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.index(key);
        if !self.shards[i].contains_key(key) {
            return None;
        }
        Some(self.shard_mut(i))
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Doubles the shards: O(entries), once per doubling of the entries, so constant per insert on average.
    /// Entries move when no clone shares them (a build) and are copied otherwise.
    fn grow(&mut self) {
        let mut grown = Self::with_shards(self.shards.len() * 2, self.hasher.clone());
        let shards = std::mem::take(&mut self.shards);
        for shard in Arc::try_unwrap(shards).unwrap_or_else(|shared| shared.as_ref().clone()) {
            match Arc::try_unwrap(shard) {
                Ok(entries) => entries.into_iter().for_each(|(k, v)| grown.insert_new(k, v)),
                Err(shared) => shared.iter().for_each(|(k, v)| grown.insert_new(k.clone(), v.clone())),
            }
        }
        *self = grown;
    }

    /// Inserts a key known to be absent, without growing: for [`Self::grow`], which sized the shards already.
    fn insert_new(&mut self, key: K, value: V) {
        let i = self.index(&key);
        self.shard_mut(i).insert(key, value);
        self.len += 1;
    }
}

/// The shard count for `expected` entries: a power of two near `expected / TARGET`.
fn shards_for(expected: usize) -> usize {
    (expected / TARGET).next_power_of_two().clamp(1, MAX_SHARDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_shares_shards_until_a_change_and_then_only_the_changed_one_is_copied() {
        let mut map: ShardedMap<u32, u32> = ShardedMap::with_capacity(10_000);
        for i in 0..10_000 {
            map.insert(i, i);
        }
        let shards = map.shards.len();
        assert!(shards >= 64, "{shards}");
        let mut copy = map.clone();
        copy.insert(5, 50);
        assert_eq!(copy.remove(&6), Some(6));
        assert_eq!(copy.remove(&6), None);
        assert_eq!((map.get(&5), map.get(&6)), (Some(&5), Some(&6)), "the original is untouched");
        assert_eq!((copy.get(&5), copy.get(&6), copy.iter().count()), (Some(&50), None, 9_999));
        let shared = map.shards.iter().zip(copy.shards.iter()).filter(|(a, b)| Arc::ptr_eq(a, b)).count();
        assert!(shared >= shards - 2, "{shared} of {shards} shards still shared");
    }

    #[test]
    fn it_grows_by_doubling_and_keeps_every_entry() {
        let mut map: ShardedMap<u32, u32> = ShardedMap::with_capacity(0);
        for i in 0..50_000 {
            map.insert(i, i * 2);
        }
        assert!(map.shards.len() >= 50_000 / TARGET / 2, "{}", map.shards.len());
        assert_eq!(map.len, 50_000);
        assert!((0..50_000).all(|i| map.get(&i) == Some(&(i * 2))));
        assert_eq!(map.iter().count(), 50_000);
        *map.get_or_insert_with(7, || 1) = 0;
        *map.get_or_insert_with(50_000, || 1) += 1;
        assert_eq!((map.get(&50_000), map.len), (Some(&2), 50_001));
        assert!(map.contains_key(&50_000));
        assert_eq!(map.get(&7), Some(&0));
        assert!(map.get_mut(&50_001).is_none());
    }
}
