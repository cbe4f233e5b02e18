//! rustbpe: a fast byte-level BPE trainer for tritonchat, in the spirit of nanochat's rustbpe.
//!
//! Training in three steps:
//! 1. Split: the Python iterator is streamed in batches of `buffer_size` strings. For each batch the GIL is
//!    released and rayon splits every text with the GPT-4 pattern (fancy-regex; numbers in groups of 1-2 as
//!    nanochat) and counts the chunks in per-thread maps that are then reduced into one map chunk -> count.
//! 2. Count pairs once: every unique chunk becomes a word (its bytes as token ids 0..255). Adjacent pairs are
//!    counted in parallel (weighted by the chunk count), and for every pair we remember the set of words that
//!    contain it.
//! 3. Merge with incremental updates: a max-heap of (count, pair) with lazy invalidation. Pop the top; if its
//!    count is stale (the pair's current count is lower), push it back with the current count and pop again.
//!    Merging pair p into a new token only visits the words listed for p, rewrites them, and applies the exact
//!    pair-count deltas (-1 for every pair destroyed, +1 for every pair created, times the word's count). The
//!    corpus is never recounted.
//!
//! Tie-break rule (the pure-Python reference trainer in tests/test_rustbpe.py follows it exactly): the pair with
//! the highest count wins; among equal counts, the lexicographically smallest pair of token ids (left, right).
//! Why lazy invalidation is exact: a pair's count can only grow in the merge that creates one of its tokens (pairs
//! containing the new token); we push those after the merge with their final count, so every heap entry is an
//! upper bound of its pair's current count, and an entry that is current when popped is a true maximum.
//!
//! Determinism: counting is a commutative sum and the merge loop is sequential, so the result does not depend on
//! the number of threads or on hash-map order.
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use ahash::{AHashMap, AHashSet};
use fancy_regex::Regex;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rayon::prelude::*;

/// GPT-4's split pattern with numbers in groups of 1-2 (nanochat), instead of 1-3.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

const MAX_VOCAB: i64 = 1 << 24;

type Pair = (u32, u32);

/// A heap entry: ordered by count, then by the smaller pair (so `BinaryHeap::pop` follows the tie-break rule).
#[derive(PartialEq, Eq)]
struct Entry {
    count: i64,
    pair: Pair,
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Rewrite `ids` with every non-overlapping occurrence of `pair` (left to right) replaced by `new_id`; push the pair
/// count deltas of this one word into `deltas`.
fn merge_word(ids: &mut Vec<u32>, pair: Pair, new_id: u32, deltas: &mut Vec<(Pair, i64)>) {
    let (a, b) = pair;
    let n = ids.len();
    let mut out: Vec<u32> = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        if i + 1 < n && ids[i] == a && ids[i + 1] == b {
            if let Some(&left) = out.last() {
                deltas.push(((left, a), -1));
                deltas.push(((left, new_id), 1));
            }
            deltas.push((pair, -1));
            if i + 2 < n {
                let right = ids[i + 2];
                deltas.push(((b, right), -1));
                deltas.push(((new_id, right), 1));
            }
            out.push(new_id);
            i += 2;
        } else {
            out.push(ids[i]);
            i += 1;
        }
    }
    *ids = out;
}

/// The BPE merge loop over unique words with counts. Returns the merges in order (merge k creates id 256 + k).
fn train_merges(words: &mut [Vec<u32>], counts: &[i64], num_merges: usize) -> Vec<Pair> {
    // One parallel pass: pair counts and, for each pair, the words that contain it.
    let (mut pair_counts, mut pair_words) = words
        .par_iter()
        .enumerate()
        .fold(
            || (AHashMap::<Pair, i64>::new(), AHashMap::<Pair, AHashSet<u32>>::new()),
            |(mut pc, mut pw), (w, ids)| {
                for win in ids.windows(2) {
                    let p = (win[0], win[1]);
                    *pc.entry(p).or_insert(0) += counts[w];
                    pw.entry(p).or_default().insert(w as u32);
                }
                (pc, pw)
            },
        )
        .reduce(
            || (AHashMap::new(), AHashMap::new()),
            |(mut pc, mut pw), (pc2, pw2)| {
                for (p, c) in pc2 {
                    *pc.entry(p).or_insert(0) += c;
                }
                for (p, s) in pw2 {
                    let dst = pw.entry(p).or_default();
                    if dst.is_empty() {
                        *dst = s;
                    } else {
                        dst.extend(s);
                    }
                }
                (pc, pw)
            },
        );

    let mut heap: BinaryHeap<Entry> = pair_counts
        .iter()
        .filter(|(_, &c)| c > 0)
        .map(|(&pair, &count)| Entry { count, pair })
        .collect();

    let mut merges: Vec<Pair> = Vec::with_capacity(num_merges);
    let mut deltas: Vec<(Pair, i64)> = Vec::new();
    while merges.len() < num_merges {
        let top = match heap.pop() {
            Some(top) => top,
            None => break,
        };
        let current = pair_counts.get(&top.pair).copied().unwrap_or(0);
        if current <= 0 {
            continue; // the pair disappeared
        }
        if current != top.count {
            heap.push(Entry { count: current, pair: top.pair }); // stale: re-queue with the current count
            continue;
        }
        let pair = top.pair;
        let new_id = 256 + merges.len() as u32;
        merges.push(pair);

        let mut new_pairs: AHashSet<Pair> = AHashSet::new();
        let touched = pair_words.remove(&pair).unwrap_or_default();
        for &w in touched.iter() {
            deltas.clear();
            merge_word(&mut words[w as usize], pair, new_id, &mut deltas);
            let c = counts[w as usize];
            for &(p, d) in deltas.iter() {
                *pair_counts.entry(p).or_insert(0) += d * c;
                if d > 0 {
                    pair_words.entry(p).or_default().insert(w);
                    new_pairs.insert(p);
                }
            }
        }
        pair_counts.remove(&pair);
        // New pairs all contain new_id; their counts only shrink from now on, so one entry each suffices.
        for p in new_pairs {
            let c = pair_counts.get(&p).copied().unwrap_or(0);
            if c > 0 {
                heap.push(Entry { count: c, pair: p });
            }
        }
    }
    merges
}

/// Split every text with `re` and count the chunks (parallel over texts).
fn count_chunks<'t>(re: &Regex, texts: &'t [String]) -> Result<AHashMap<&'t str, i64>, String> {
    texts
        .par_iter()
        .try_fold(AHashMap::<&'t str, i64>::new, |mut m, text| {
            for mat in re.find_iter(text) {
                let mat = mat.map_err(|e| format!("regex error while splitting text: {e}"))?;
                *m.entry(mat.as_str()).or_insert(0) += 1;
            }
            Ok(m)
        })
        .try_reduce(AHashMap::new, |a, b| {
            let (mut big, small) = if a.len() < b.len() { (b, a) } else { (a, b) };
            for (k, v) in small {
                *big.entry(k).or_insert(0) += v;
            }
            Ok(big)
        })
}

fn compile(pattern: &str) -> PyResult<Regex> {
    Regex::new(pattern).map_err(|e| PyValueError::new_err(format!("invalid split pattern {pattern:?}: {e}")))
}

fn thread_pool(num_threads: Option<usize>) -> PyResult<rayon::ThreadPool> {
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(n) = num_threads {
        if n == 0 {
            return Err(PyValueError::new_err("num_threads must be >= 1 (or None for all cores)"));
        }
        builder = builder.num_threads(n);
    }
    builder.build().map_err(|e| PyValueError::new_err(format!("could not start the thread pool: {e}")))
}

/// A byte-level BPE tokenizer: train it, read its merges as tiktoken mergeable ranks, encode (for checking).
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    merges: Vec<Pair>,
    ranks: AHashMap<Pair, u32>,
    compiled: Option<Regex>,
}

impl Tokenizer {
    fn regex(&mut self) -> PyResult<&Regex> {
        if self.compiled.is_none() {
            self.compiled = Some(compile(&self.pattern)?);
        }
        Ok(self.compiled.as_ref().unwrap())
    }

    fn token_bytes(&self) -> Vec<Vec<u8>> {
        let mut vocab: Vec<Vec<u8>> = (0..256u32).map(|b| vec![b as u8]).collect();
        for &(a, b) in &self.merges {
            let mut v = vocab[a as usize].clone();
            v.extend_from_slice(&vocab[b as usize]);
            vocab.push(v);
        }
        vocab
    }

    fn encode_chunk(&self, chunk: &str, out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = chunk.bytes().map(u32::from).collect();
        while ids.len() >= 2 {
            // The lowest-rank (earliest) merge present in the chunk is applied first, as tiktoken does.
            let best = ids
                .windows(2)
                .filter_map(|w| self.ranks.get(&(w[0], w[1])).copied())
                .min();
            let new_id = match best {
                Some(id) => id,
                None => break,
            };
            let pair = self.merges[(new_id - 256) as usize];
            let mut scratch = Vec::new();
            merge_word(&mut ids, pair, new_id, &mut scratch);
        }
        out.extend_from_slice(&ids);
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        Tokenizer { pattern: GPT4_PATTERN.to_string(), merges: Vec::new(), ranks: AHashMap::new(), compiled: None }
    }

    /// Train on an iterator of str. vocab_size in [256, 2**24]; pattern=None means the GPT-4 pattern
    /// (numbers in 1-2 digit groups); buffer_size = texts per parallel batch; num_threads=None = all cores.
    /// Stops early (smaller vocab) if the corpus runs out of pairs.
    #[args(pattern = "None", buffer_size = "8192", num_threads = "None")]
    #[pyo3(text_signature = "($self, iterator, vocab_size, pattern=None, buffer_size=8192, num_threads=None)")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &PyAny,
        vocab_size: i64,
        pattern: Option<String>,
        buffer_size: i64,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        if !(256..=MAX_VOCAB).contains(&vocab_size) {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be in [256, 2**24 = {MAX_VOCAB}], got {vocab_size}"
            )));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!("buffer_size must be >= 1, got {buffer_size}")));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN.to_string());
        let re = compile(&pattern)?;
        let pool = thread_pool(num_threads)?;

        // 1. Stream the iterator in batches; count chunks with the GIL released.
        let mut counts: AHashMap<String, i64> = AHashMap::new();
        let mut batch: Vec<String> = Vec::with_capacity(buffer_size as usize);
        let mut index: usize = 0;
        let mut items = iterator.iter().map_err(|_| {
            PyTypeError::new_err(format!(
                "train_from_iterator expects an iterable of str, got {}",
                iterator.get_type().name().unwrap_or("?")
            ))
        })?;
        loop {
            batch.clear();
            let mut exhausted = false;
            while batch.len() < buffer_size as usize {
                match items.next() {
                    None => {
                        exhausted = true;
                        break;
                    }
                    Some(item) => {
                        let item = item?;
                        let s = item.downcast::<PyString>().map_err(|_| {
                            PyTypeError::new_err(format!(
                                "train_from_iterator: item {index} is {}, expected str",
                                item.get_type().name().unwrap_or("?")
                            ))
                        })?;
                        batch.push(s.to_str()?.to_owned());
                        index += 1;
                    }
                }
            }
            if !batch.is_empty() {
                let (re, batch_ref, counts_ref, pool) = (&re, &batch, &mut counts, &pool);
                py.allow_threads(move || -> Result<(), String> {
                    let local = pool.install(|| count_chunks(re, batch_ref))?;
                    for (k, v) in local {
                        match counts_ref.get_mut(k) {
                            Some(c) => *c += v,
                            None => {
                                counts_ref.insert(k.to_owned(), v);
                            }
                        }
                    }
                    Ok(())
                })
                .map_err(PyValueError::new_err)?;
            }
            if exhausted {
                break;
            }
        }
        drop(batch);

        // 2 + 3. Words from unique chunks, then the merge loop (GIL released).
        let num_merges = (vocab_size - 256) as usize;
        let merges = py.allow_threads(move || {
            pool.install(|| {
                let mut chunks: Vec<(String, i64)> = counts.into_iter().collect();
                chunks.sort_unstable(); // a fixed word order, so runs are reproducible to the last detail
                let mut words: Vec<Vec<u32>> = chunks.iter().map(|(s, _)| s.bytes().map(u32::from).collect()).collect();
                let wcounts: Vec<i64> = chunks.iter().map(|(_, c)| *c).collect();
                drop(chunks);
                train_merges(&mut words, &wcounts, num_merges)
            })
        });
        self.ranks = merges.iter().enumerate().map(|(i, &p)| (p, 256 + i as u32)).collect();
        self.merges = merges;
        self.pattern = pattern;
        self.compiled = Some(re);
        Ok(())
    }

    /// The split pattern (the GPT-4 pattern unless training was given another one).
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// [(token bytes, rank)] for all 256 + len(merges) tokens, in rank order: feed to tiktoken.Encoding.
    fn get_mergeable_ranks(&self, py: Python<'_>) -> Vec<(PyObject, u32)> {
        self.token_bytes()
            .into_iter()
            .enumerate()
            .map(|(i, b)| (PyBytes::new(py, &b).into(), i as u32))
            .collect()
    }

    /// [(left id, right id)] in merge order; merge k created token 256 + k.
    fn get_merges(&self) -> Vec<Pair> {
        self.merges.clone()
    }

    /// 256 + number of merges learned.
    fn get_vocab_size(&self) -> usize {
        256 + self.merges.len()
    }

    /// Encode one string (split with the pattern, then apply merges in rank order). Slow path for checking;
    /// use tiktoken for real encoding.
    fn encode(&mut self, text: &str) -> PyResult<Vec<u32>> {
        let chunks: Vec<String> = {
            let re = self.regex()?;
            let mut v = Vec::new();
            for m in re.find_iter(text) {
                let m = m.map_err(|e| PyValueError::new_err(format!("regex error while splitting text: {e}")))?;
                v.push(m.as_str().to_owned());
            }
            v
        };
        let mut out = Vec::with_capacity(text.len());
        for c in &chunks {
            self.encode_chunk(c, &mut out);
        }
        Ok(out)
    }
}

#[pymodule]
fn rustbpe(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    Ok(())
}
