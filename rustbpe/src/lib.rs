//! rustbpe: a fast byte-level BPE trainer for tritonchat, in the spirit of nanochat's rustbpe.
//!
//! 1. Split: the Python iterator is streamed in batches of `buffer_size` strings; rayon splits every text (GIL
//!    released) with the GPT-4 pattern (numbers in groups of 1-2, as nanochat) and counts the chunks. The default
//!    pattern runs through a hand-written scanner, equal to the regex (tests compare both on random Unicode) and
//!    several times faster than fancy-regex, which splits any other pattern.
//! 2. Every unique chunk becomes a word (its bytes as ids 0..255); adjacent pairs are counted once, in parallel,
//!    weighted by the chunk count, remembering for every pair the words that hold it.
//! 3. Merge incrementally: a max-heap of (count, pair) with lazy invalidation. Merging pair p only rewrites the words
//!    listed for p and applies the exact pair-count deltas (-1 per pair destroyed, +1 per pair created, times the
//!    word's count). Exact because a pair's count only grows in the merge that creates one of its tokens, after which
//!    it is pushed with its final count: every entry is an upper bound, and one that is current when popped is a
//!    true maximum. Ties: the highest count wins, then the smallest pair (left, right), as the Python reference in
//!    tests/test_rustbpe.py; the result depends neither on the number of threads nor on hash-map order.
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ahash::AHashMap;
use fancy_regex::Regex;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rayon::prelude::*;

/// GPT-4's split pattern with numbers in groups of 1-2 (nanochat), instead of 1-3.
pub const GPT4_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

const MAX_VOCAB: i64 = 1 << 24;

type Pair = (u32, u32);

/// A heap entry: a pair's count when pushed, the pair (reversed: among equal counts the smaller pair pops first) and
/// the words that may contain it (a superset). A pair has at most one entry, so the order never compares `words`.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    count: i64,
    pair: Reverse<Pair>,
    words: Vec<u32>,
}

/// Rewrite `ids` with every non-overlapping occurrence of `pair` (left to right) replaced by `new_id`; push the pair
/// count deltas of this one word into `deltas`.
fn merge_word(ids: &mut Vec<u32>, pair: Pair, new_id: u32, deltas: &mut Vec<(Pair, i64)>) {
    let (a, b) = pair;
    let n = ids.len();
    // Words listed for a pair they no longer hold (stale entries) are left untouched, without allocating.
    let mut i = if let Some(i) = ids.windows(2).position(|w| w[0] == a && w[1] == b) { i } else { return };
    let mut out: Vec<u32> = Vec::with_capacity(n);
    out.extend_from_slice(&ids[..i]);
    while i < n {
        if i + 1 < n && ids[i] == a && ids[i + 1] == b {
            if let Some(&left) = out.last() {
                deltas.extend([((left, a), -1), ((left, new_id), 1)]);
            }
            deltas.push((pair, -1));
            if let Some(&right) = ids.get(i + 2) {
                deltas.extend([((b, right), -1), ((new_id, right), 1)]);
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
    // One parallel pass: each pair's count and the words that hold it (in increasing order: each fold covers a
    // contiguous, ordered range of words and the reduce keeps the ranges in order).
    let pairs = words
        .par_iter()
        .enumerate()
        .fold(AHashMap::<Pair, (i64, Vec<u32>)>::new, |mut m, (w, ids)| {
            for win in ids.windows(2) {
                let (count, list) = m.entry((win[0], win[1])).or_default();
                *count += counts[w];
                if list.last() != Some(&(w as u32)) {
                    list.push(w as u32);
                }
            }
            m
        })
        .reduce(AHashMap::new, |mut m, m2| {
            for (p, (c, list)) in m2 {
                let (count, words) = m.entry(p).or_default();
                *count += c;
                words.extend(list);
            }
            m
        });
    let mut heap: BinaryHeap<Entry> =
        pairs.into_iter().map(|(pair, (count, words))| Entry { count, pair: Reverse(pair), words }).collect();
    let mut pair_counts: AHashMap<Pair, i64> = heap.iter().map(|e| (e.pair.0, e.count)).collect();

    let mut merges: Vec<Pair> = Vec::with_capacity(num_merges);
    let mut deltas: Vec<(Pair, i64)> = Vec::new();
    while let Some(mut top) = heap.pop().filter(|_| merges.len() < num_merges) {
        let pair = top.pair.0;
        // Every entry is pushed with a count > 0; a lower current count is stale: re-queue it (or drop the pair).
        let current = pair_counts.get(&pair).copied().unwrap_or(0);
        if current != top.count {
            if current > 0 {
                top.count = current;
                heap.push(top);
            }
            continue;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push(pair);

        // Words gaining a pair (all new pairs contain new_id), in increasing word order.
        let mut new_pairs: AHashMap<Pair, Vec<u32>> = AHashMap::new();
        for &w in top.words.iter() {
            deltas.clear();
            merge_word(&mut words[w as usize], pair, new_id, &mut deltas);
            let c = counts[w as usize];
            for &(p, d) in deltas.iter() {
                *pair_counts.entry(p).or_insert(0) += d * c;
                if d > 0 {
                    let list = new_pairs.entry(p).or_default();
                    if list.last() != Some(&w) {
                        list.push(w);
                    }
                }
            }
        }
        pair_counts.remove(&pair);
        // A new pair's count only shrinks from now on, so one entry pushed with its final count is exact.
        for (p, words) in new_pairs {
            let c = pair_counts.get(&p).copied().unwrap_or(0);
            if c > 0 {
                heap.push(Entry { count: c, pair: Reverse(p), words });
            }
        }
    }
    merges
}

const LET: u8 = 1;
const NUM: u8 = 2;
const SPC: u8 = 4;

/// Character classes of the GPT-4 pattern, taken from regex-syntax's Unicode tables (the ones fancy-regex uses),
/// so the scanner and the regex agree character for character.
struct Classes {
    ranges: [Vec<(char, char)>; 3], // \p{L}, \p{N}, \s: the flags LET, NUM, SPC
    folds: Vec<(char, char)>,       // every character of (?i:[sdmtlvre]) -> its ASCII letter (U+017F long s -> s)
    ascii: [u8; 128],
}

fn class_ranges(class: &str) -> Vec<(char, char)> {
    use regex_syntax::hir::{Class, Hir, HirKind, Literal};
    fn ranges(hir: &Hir) -> Vec<(char, char)> {
        match hir.kind() {
            HirKind::Class(Class::Unicode(c)) => c.ranges().iter().map(|r| (r.start(), r.end())).collect(),
            HirKind::Literal(Literal::Unicode(c)) => vec![(*c, *c)],
            HirKind::Group(g) => ranges(&g.hir),
            _ => panic!("not a character class: {hir:?}"),
        }
    }
    ranges(&regex_syntax::Parser::new().parse(class).expect("fixed character class"))
}

impl Classes {
    fn new() -> Self {
        let mut folds = Vec::new();
        for letter in "sdmtlvre".chars() {
            for (lo, hi) in class_ranges(&format!("(?i:{letter})")) {
                folds.extend((lo..=hi).map(|ch| (ch, letter)));
            }
        }
        let mut c = Classes { ranges: [r"\p{L}", r"\p{N}", r"\s"].map(class_ranges), folds, ascii: [0; 128] };
        c.ascii = std::array::from_fn(|b| c.slow_flags(b as u8 as char));
        c
    }

    fn slow_flags(&self, ch: char) -> u8 {
        // the ranges are sorted and disjoint: the first one not below ch holds it, or none does
        let has = |r: &[(char, char)]| r.get(r.partition_point(|&(_, hi)| hi < ch)).map_or(false, |&(lo, _)| lo <= ch);
        (0..3).filter(|&k| has(&self.ranges[k])).fold(0, |f, k| f | 1 << k)
    }

    #[inline]
    fn flags(&self, ch: char) -> u8 {
        self.ascii.get(ch as usize).copied().unwrap_or_else(|| self.slow_flags(ch))
    }

    /// The ASCII letter of (?i:[sdmtlvre]) that `ch` matches, or '\0'.
    fn fold(&self, ch: char) -> char {
        self.folds.iter().find(|&&(c, _)| c == ch).map_or('\0', |&(_, letter)| letter)
    }
}

#[inline]
fn char_at(text: &str, i: usize) -> Option<char> {
    text[i..].chars().next()
}

/// The end of the run of characters from byte `i` whose flags satisfy `keep`.
#[inline]
fn run_end(cl: &Classes, text: &str, mut i: usize, keep: impl Fn(u8) -> bool) -> usize {
    while let Some(ch) = char_at(text, i).filter(|&ch| keep(cl.flags(ch))) {
        i += ch.len_utf8();
    }
    i
}

/// End (byte offset) of the GPT4_PATTERN match starting at `pos`, trying its seven alternatives in the regex's
/// leftmost-first order. Every character starts some alternative, so the matches tile the text and none is empty.
fn gpt4_chunk_end(cl: &Classes, text: &str, pos: usize) -> usize {
    let c = char_at(text, pos).unwrap();
    let after_c = pos + c.len_utf8();
    let (fc, c1) = (cl.flags(c), char_at(text, after_c));
    let f1 = c1.map(|ch| cl.flags(ch));
    // 1. contractions
    if let (Some(c1), '\'') = (c1, c) {
        let after_c1 = after_c + c1.len_utf8();
        if "sdmt".contains(cl.fold(c1)) {
            return after_c1;
        }
        if let Some(c2) = char_at(text, after_c1) {
            if matches!((cl.fold(c1), cl.fold(c2)), ('l', 'l') | ('v', 'e') | ('r', 'e')) {
                return after_c1 + c2.len_utf8();
            }
        }
    }
    // 2. an optional non-letter/number/CR/LF (possessive) then letters
    let letter = |f: u8| f & LET != 0;
    if letter(fc) || (fc & NUM == 0 && c != '\r' && c != '\n' && f1.map_or(false, letter)) {
        return run_end(cl, text, after_c, letter);
    }
    // 3. one or two numbers
    if fc & NUM != 0 {
        return after_c + c1.filter(|&ch| cl.flags(ch) & NUM != 0).map_or(0, char::len_utf8);
    }
    // 4. an optional space, other characters (possessive), then CR/LF
    let other = |f: u8| f & (LET | NUM | SPC) == 0;
    if other(fc) || (c == ' ' && f1.map_or(false, other)) {
        let i = run_end(cl, text, if c == ' ' { after_c } else { pos }, other);
        return i + text[i..].bytes().take_while(|&b| b == b'\r' || b == b'\n').count();
    }
    // 5-7. c is whitespace: scan its run, remembering the last CR/LF and the start of the last character
    let (mut i, mut last_crlf, mut last_start) = (pos, None, pos);
    while let Some(ch) = char_at(text, i).filter(|&ch| cl.flags(ch) & SPC != 0) {
        last_start = i;
        i += ch.len_utf8();
        if ch == '\r' || ch == '\n' {
            last_crlf = Some(i);
        }
    }
    if let Some(end) = last_crlf {
        return end; // 5. \s*[\r\n]: up to the last CR/LF of the run
    }
    if i == text.len() || last_start == pos {
        return i; // 6. the run ends the text, or 7. a single whitespace character
    }
    last_start // 6. leave the last whitespace character to the next chunk (" word")
}

/// How text is cut into chunks: the GPT-4 scanner for the default pattern, fancy-regex for any other.
enum Splitter {
    Gpt4(Classes),
    Regex(Regex),
}

impl Splitter {
    fn new(pattern: &str, force_regex: bool) -> PyResult<Splitter> {
        // every pattern is compiled, the default one too, so a bad one fails here with a clear message
        let re = Regex::new(pattern)
            .map_err(|e| PyValueError::new_err(format!("invalid split pattern {pattern:?}: {e}")))?;
        Ok(if pattern == GPT4_PATTERN && !force_regex { Splitter::Gpt4(Classes::new()) } else { Splitter::Regex(re) })
    }

    fn for_each<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> PyResult<()> {
        match self {
            Splitter::Gpt4(cl) => {
                let mut pos = 0;
                while pos < text.len() {
                    let end = gpt4_chunk_end(cl, text, pos);
                    f(&text[pos..end]);
                    pos = end;
                }
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    f(m.map_err(|e| PyValueError::new_err(format!("regex error while splitting text: {e}")))?.as_str());
                }
            }
        }
        Ok(())
    }
}

/// Split every text and count the chunks (parallel over texts).
fn count_chunks<'t>(sp: &Splitter, texts: &'t [String]) -> PyResult<AHashMap<&'t str, i64>> {
    texts
        .par_iter()
        .try_fold(AHashMap::<&'t str, i64>::new, |mut m, text| {
            sp.for_each(text, |chunk| *m.entry(chunk).or_insert(0) += 1)?;
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

/// A Python str as UTF-8, the way tiktoken's encoder takes it: a str holding surrogates (legal in Python, not in
/// UTF-8) goes through UTF-16 with "surrogatepass" and back with "replace", so a surrogate pair becomes its character
/// and a lone surrogate U+FFFD. Every string the encoder accepts is thus a string the trainer accepts, read the same.
fn to_utf8(s: &PyString) -> PyResult<String> {
    if let Ok(text) = s.to_str() {
        return Ok(text.to_owned());
    }
    let fixed = s.call_method1("encode", ("utf-16", "surrogatepass"))?.call_method1("decode", ("utf-16", "replace"))?;
    Ok(fixed.downcast::<PyString>()?.to_str()?.to_owned())
}

/// A byte-level BPE tokenizer: train it, read its merges as tiktoken mergeable ranks, encode (for checking).
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    merges: Vec<Pair>,
    ranks: AHashMap<Pair, u32>,
    splitter: Splitter,
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        let splitter = Splitter::new(GPT4_PATTERN, false).expect("the GPT-4 pattern compiles");
        Tokenizer { pattern: GPT4_PATTERN.to_string(), merges: Vec::new(), ranks: AHashMap::new(), splitter }
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
            let msg = format!("vocab_size must be in [256, 2**24 = {MAX_VOCAB}], got {vocab_size}");
            return Err(PyValueError::new_err(msg));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!("buffer_size must be >= 1, got {buffer_size}")));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN.to_string());
        let sp = Splitter::new(&pattern, false)?;
        if num_threads == Some(0) {
            return Err(PyValueError::new_err("num_threads must be >= 1 (or None for all cores)"));
        }
        let pool = rayon::ThreadPoolBuilder::new() // 0 threads: rayon picks (all cores)
            .num_threads(num_threads.unwrap_or(0))
            .build()
            .map_err(|e| PyValueError::new_err(format!("could not start the thread pool: {e}")))?;

        // 1. Stream the iterator in batches; count chunks with the GIL released.
        let type_name = |o: &PyAny| o.get_type().name().unwrap_or("?").to_string();
        let mut items = iterator.iter().map_err(|_| {
            PyTypeError::new_err(format!("train_from_iterator expects an iterable of str, got {}", type_name(iterator)))
        })?;
        let mut counts: AHashMap<String, i64> = AHashMap::new();
        let mut batch: Vec<String> = Vec::with_capacity(buffer_size.min(1 << 16) as usize); // huge sizes: grow
        let mut index: usize = 0;
        loop {
            batch.clear();
            for item in items.by_ref().take(buffer_size as usize) {
                let item = item?;
                let s = item.downcast::<PyString>().map_err(|_| {
                    let msg = format!("train_from_iterator: item {index} is {}, expected str", type_name(item));
                    PyTypeError::new_err(msg)
                })?;
                batch.push(to_utf8(s)?);
                index += 1;
            }
            py.allow_threads(|| -> PyResult<()> {
                for (k, v) in pool.install(|| count_chunks(&sp, &batch))? {
                    if let Some(c) = counts.get_mut(k) {
                        *c += v;
                    } else {
                        counts.insert(k.to_owned(), v);
                    }
                }
                Ok(())
            })?;
            if batch.len() < buffer_size as usize {
                break; // the iterator is exhausted
            }
        }
        drop(batch);

        // 2 + 3. Words from unique chunks, then the merge loop (GIL released).
        let num_merges = (vocab_size - 256) as usize;
        let merges = py.allow_threads(move || {
            pool.install(|| {
                let mut chunks: Vec<(String, i64)> = counts.into_iter().collect();
                chunks.sort_unstable(); // a fixed word order, so runs are reproducible to the last detail
                let (mut words, wcounts): (Vec<Vec<u32>>, Vec<i64>) =
                    chunks.into_iter().map(|(s, c)| (s.bytes().map(u32::from).collect(), c)).unzip();
                train_merges(&mut words, &wcounts, num_merges)
            })
        });
        self.ranks = merges.iter().enumerate().map(|(i, &p)| (p, 256 + i as u32)).collect();
        self.merges = merges;
        self.pattern = pattern;
        self.splitter = sp;
        Ok(())
    }

    /// The split pattern (the GPT-4 pattern unless training was given another one).
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// [(token bytes, rank)] for all 256 + len(merges) tokens, in rank order: feed to tiktoken.Encoding.
    fn get_mergeable_ranks(&self, py: Python<'_>) -> Vec<(PyObject, u32)> {
        let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in &self.merges {
            vocab.push([vocab[a as usize].as_slice(), vocab[b as usize].as_slice()].concat());
        }
        vocab.iter().enumerate().map(|(i, b)| (PyBytes::new(py, b).into(), i as u32)).collect()
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
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        let (mut out, ranks, merges) = (Vec::with_capacity(text.len()), &self.ranks, &self.merges);
        self.splitter.for_each(text, |chunk| {
            let mut ids: Vec<u32> = chunk.bytes().map(u32::from).collect();
            // The lowest-rank (earliest) merge present in the chunk is applied first, as tiktoken does.
            while let Some(new_id) = ids.windows(2).filter_map(|w| ranks.get(&(w[0], w[1])).copied()).min() {
                merge_word(&mut ids, merges[(new_id - 256) as usize], new_id, &mut Vec::new());
            }
            out.extend_from_slice(&ids);
        })?;
        Ok(out)
    }
}

/// Split each text into chunks with `pattern` (default: GPT-4's, through the hand-written scanner unless
/// force_regex=True, which uses fancy-regex). For tests and inspection.
#[pyfunction(pattern = "None", force_regex = "false")]
#[pyo3(text_signature = "(texts, pattern=None, force_regex=False)")]
fn split_texts(texts: Vec<&PyString>, pattern: Option<&str>, force_regex: bool) -> PyResult<Vec<Vec<String>>> {
    let sp = Splitter::new(pattern.unwrap_or(GPT4_PATTERN), force_regex)?;
    let split = |s: &PyString| {
        let (text, mut chunks) = (to_utf8(s)?, Vec::new());
        sp.for_each(&text, |c| chunks.push(c.to_owned())).map(|_| chunks)
    };
    texts.into_iter().map(split).collect()
}

#[pymodule]
fn tritonchat_rustbpe(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_texts, m)?)?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    Ok(())
}
