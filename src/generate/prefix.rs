//! Reusing the keys and values of a prompt's beginning.
//!
//! DSPy programs send the same long start again and again: the system message with the
//! signature, then the same few-shot demos; only the last user message changes. With 16 demos
//! that start is over a thousand tokens, and computing it again for every example is most of
//! an evaluation's time on a CPU. A [`PrefixCache`] keeps the key/value cache of recent
//! prompts; a new single-sequence prompt starts from the longest one it shares, so only the
//! tokens after it are run through the model (vLLM's "automatic prefix caching", for one
//! sequence at a time).
//!
//! The cached values come from an earlier forward pass over more (or fewer) tokens at once,
//! whose matrix products may round differently in the last bits: logits agree with a fresh
//! run to ~1e-5, and greedy outputs only differ at near-ties.

use std::sync::Mutex;

use crate::model::KvCache;
use crate::Result;

/// Prompts shorter than this are not worth keeping.
const MIN_TOKENS: usize = 32;

/// Key/value caches of the last few prompts, shared by the calls of one model (interior
/// mutability, so an `Arc<Model>` user can hold one).
///
/// The caches belong to the model's weights as they were: clear it after changing them
/// (training, merging, switching adapters).
#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Least recently used first.
    entries: Vec<(Vec<u32>, KvCache)>,
    stats: PrefixCacheStats,
}

/// How much a [`PrefixCache`] saved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompts looked up.
    pub lookups: usize,
    /// Prompts that started from a cached prefix.
    pub hits: usize,
    /// Prompt tokens in all the lookups.
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the cache instead of computed.
    pub reused_tokens: usize,
}

impl PrefixCache {
    /// A cache of the last `capacity` prompts (each holds its keys and values: for SmolLM2-135M,
    /// 46 KB per token).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cache of the longest stored prefix of `prompt`, cut to that length, which always
    /// leaves at least one token of `prompt` to run; `None` when nothing is shared.
    pub fn lookup(&self, prompt: &[u32]) -> Result<Option<(usize, KvCache)>> {
        let mut state = self.state();
        state.stats.lookups += 1;
        state.stats.prompt_tokens += prompt.len();
        let best = state
            .entries
            .iter()
            .enumerate()
            .map(|(i, (tokens, _))| {
                let shared = tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, shared.min(prompt.len().saturating_sub(1)))
            })
            .max_by_key(|&(i, shared)| (shared, i));
        let Some((i, shared)) = best.filter(|&(_, shared)| shared >= MIN_TOKENS) else {
            return Ok(None);
        };
        let entry = state.entries.remove(i);
        let mut kv = entry.1.clone();
        state.entries.push(entry);
        kv.truncate(shared)?;
        state.stats.hits += 1;
        state.stats.reused_tokens += shared;
        Ok(Some((shared, kv)))
    }

    /// Keeps `kv`, the cache right after `prompt` was run, dropping the least recently used
    /// entry when full (and any entry `prompt` extends).
    pub fn store(&self, prompt: &[u32], kv: KvCache) {
        if prompt.len() < MIN_TOKENS {
            return;
        }
        let kv = kv.detached();
        let mut state = self.state();
        state
            .entries
            .retain(|(tokens, _)| !prompt.starts_with(tokens));
        if state.entries.len() >= self.capacity {
            state.entries.remove(0);
        }
        state.entries.push((prompt.to_vec(), kv));
    }

    /// What was reused so far.
    pub fn stats(&self) -> PrefixCacheStats {
        self.state().stats
    }

    /// Forgets every prompt (after the model's weights changed).
    pub fn clear(&self) {
        self.state().entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn kv(len: usize) -> KvCache {
        let mut c = KvCache::new(1);
        let k = Tensor::zeros((1, 1, len, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        c.append(0, &k, &k).unwrap();
        c
    }

    #[test]
    fn longest_shared_prefix_is_reused_and_one_token_is_left_to_run() {
        let cache = PrefixCache::new(2);
        let a: Vec<u32> = (0..100).collect();
        cache.store(&a, kv(100));
        // Shares 60 tokens.
        let b: Vec<u32> = (0..60).chain(500..540).collect();
        let (n, c) = cache.lookup(&b).unwrap().unwrap();
        assert_eq!((n, c.seq_len()), (60, 60));
        // The same prompt again: all but its last token.
        let (n, c) = cache.lookup(&a).unwrap().unwrap();
        assert_eq!((n, c.seq_len()), (99, 99));
        // Too little in common.
        let d: Vec<u32> = (0..10).chain(900..990).collect();
        assert!(cache.lookup(&d).unwrap().is_none());
        let s = cache.stats();
        assert_eq!((s.lookups, s.hits, s.reused_tokens), (3, 2, 159));
        // Least recently used goes first; a prompt that extends an entry replaces it.
        cache.store(&b, kv(100));
        let e: Vec<u32> = (1000..1100).collect();
        cache.store(&e, kv(100));
        // `a` was evicted: only the 60 tokens it shares with `b` are found.
        assert_eq!(cache.lookup(&a).unwrap().unwrap().0, 60);
        let longer: Vec<u32> = (1000..1150).collect();
        cache.store(&longer, kv(150));
        assert_eq!(cache.lookup(&longer).unwrap().unwrap().0, 149);
        cache.clear();
        assert!(cache.lookup(&longer).unwrap().is_none());
    }
}
