//! Sequence-classification data: JSONL examples, tokenisation, padded batches, and the
//! synthetic sentiment task the tests and benchmarks train on.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

use crate::bert::Batch;
use crate::rng::Rng;

pub use delta_client::jobs::{Example, parse_jsonl};

/// Reads a JSONL file.
pub fn load_jsonl(path: &Path) -> Result<Vec<Example>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_jsonl(&bytes, &path.display().to_string())
}

/// The label set, sorted (numerically when every label is an integer).
pub fn label_set(examples: &[Example]) -> Vec<String> {
    let set: BTreeSet<&str> = examples.iter().map(|e| e.label.as_str()).collect();
    let mut v: Vec<String> = set.into_iter().map(str::to_owned).collect();
    if v.iter().all(|l| l.parse::<i64>().is_ok()) {
        v.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
    }
    v
}

/// A tokenised example.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Token ids with special tokens.
    pub ids: Vec<u32>,
    /// Segment ids.
    pub type_ids: Vec<u32>,
    /// Label index, if the label is known.
    pub label: Option<usize>,
}

/// A tokenizer with padding off and truncation set explicitly (MiniLM's `tokenizer.json`
/// pads to 128 and truncates at 128 on its own).
#[derive(Debug, Clone)]
pub struct Tok(Tokenizer);

impl Tok {
    /// Loads `tokenizer.json`.
    pub fn load(path: &Path, max_len: usize) -> Result<Self> {
        let t = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
        Self::configure(t, max_len)
    }

    fn configure(mut t: Tokenizer, max_len: usize) -> Result<Self> {
        t.with_padding(None);
        t.with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| anyhow::anyhow!("setting truncation: {e}"))?;
        Ok(Self(t))
    }

    /// A word-level tokenizer over `words` with BERT's special tokens (ids 0-4: `[PAD]`,
    /// `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`), for tiny test models.
    pub fn word_level(words: &[&str], max_len: usize) -> Result<Self> {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::whitespace::Whitespace;
        use tokenizers::processors::bert::BertProcessing;
        let mut vocab: HashMap<String, u32> = HashMap::new();
        for (i, w) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .iter()
            .chain(words)
            .enumerate()
        {
            vocab.entry((*w).to_owned()).or_insert(i as u32);
        }
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| anyhow::anyhow!("word-level vocabulary: {e}"))?;
        let mut t = Tokenizer::new(model);
        t.with_pre_tokenizer(Some(Whitespace {}));
        t.with_normalizer(Some(tokenizers::normalizers::utils::Lowercase))
            .map_err(|e| anyhow::anyhow!("setting the normalizer: {e}"))?;
        t.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), 3),
            ("[CLS]".into(), 2),
        )));
        Self::configure(t, max_len)
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.0
            .save(path, false)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }

    /// Token and segment ids of one text or pair.
    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = match pair {
            None => self.0.encode(text, true),
            Some(p) => self.0.encode((text, p), true),
        }
        .map_err(|e| anyhow::anyhow!("tokenising {text:?}: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// Tokenises examples; a label outside `labels` is an error naming it.
    pub fn encode_all(&self, examples: &[Example], labels: &[String]) -> Result<Vec<Encoded>> {
        examples
            .iter()
            .map(|e| {
                let (ids, type_ids) = self.encode(&e.text, e.text_pair.as_deref())?;
                let label = labels.iter().position(|l| *l == e.label);
                Ok(Encoded {
                    ids,
                    type_ids,
                    label,
                })
            })
            .collect()
    }
}

/// Pads examples on the right into one batch.
pub fn batch(items: &[&Encoded], device: &Device) -> Result<Batch> {
    let len = items.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
    let n = items.len();
    let mut ids = vec![0u32; n * len];
    let mut types = vec![0u32; n * len];
    let mut mask = vec![0f32; n * len];
    for (i, e) in items.iter().enumerate() {
        for (j, (&id, &ty)) in e.ids.iter().zip(&e.type_ids).enumerate() {
            ids[i * len + j] = id;
            types[i * len + j] = ty;
            mask[i * len + j] = 1.0;
        }
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (n, len), device)?,
        type_ids: Tensor::from_vec(types, (n, len), device)?,
        mask: Tensor::from_vec(mask, (n, len), device)?,
    })
}

const POSITIVE: &[&str] = &[
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "superb",
    "lovely",
    "brilliant",
    "enjoyable",
    "fantastic",
    "charming",
    "moving",
    "pleasant",
];
const NEGATIVE: &[&str] = &[
    "terrible",
    "awful",
    "boring",
    "dreadful",
    "poor",
    "disappointing",
    "dull",
    "horrible",
    "tedious",
    "bland",
    "messy",
    "painful",
];
const SUBJECTS: &[&str] = &[
    "the film",
    "the food",
    "the service",
    "the book",
    "this album",
    "the hotel",
    "our trip",
    "the show",
    "the game",
    "the lecture",
    "the concert",
    "the meal",
];
const FRAMES: &[&str] = &[
    "{s} was {a}.",
    "honestly, {s} was {a}.",
    "i thought {s} was really {a}.",
    "{s} turned out {a} in the end.",
    "all in all {s} felt {a}.",
    "we found {s} {a} and would say so again.",
];

/// Longer texts for benchmarks: `n` examples, each `join` sentiment sentences joined (four
/// fill about 64 MiniLM tokens), labelled as the first.
pub fn joined_sentences(n: usize, join: usize, seed: u64) -> Vec<Example> {
    sentiment(n * join, seed)
        .chunks(join.max(1))
        .map(|c| Example {
            text: c
                .iter()
                .map(|e| e.text.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            text_pair: None,
            label: c[0].label.clone(),
        })
        .collect()
}

/// Every word the sentiment generator uses (for a word-level test tokenizer).
pub fn sentiment_vocabulary() -> Vec<&'static str> {
    let mut words: BTreeSet<&str> = BTreeSet::new();
    for t in POSITIVE
        .iter()
        .chain(NEGATIVE)
        .chain(SUBJECTS)
        .chain(FRAMES)
        .chain(&["not"])
    {
        for w in t.split(|c: char| !c.is_alphanumeric() && c != '{' && c != '}') {
            if !w.is_empty() && !w.starts_with('{') {
                words.insert(w);
            }
        }
    }
    words.insert(".");
    words.insert(",");
    words.into_iter().collect()
}

/// A seeded sentiment dataset: `n` sentences labelled `positive`/`negative`, a quarter of
/// them negated ("was not great" is negative), so a bag of words is not enough.
pub fn sentiment(n: usize, seed: u64) -> Vec<Example> {
    generate(n, seed, true)
}

/// The easy variant for tiny random models: one frame, no negation. A random 2-layer
/// encoder's mean-pooled features drown one word among many, so only this variant is
/// learnable from scratch in a few hundred steps.
pub fn sentiment_simple(n: usize, seed: u64) -> Vec<Example> {
    generate(n, seed, false)
}

/// Which side of the synthetic task's fixed train/eval partition to draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// About 80% of the possible sentences.
    Train,
    /// The other 20%: no sentence of the training side ever appears here, whatever the
    /// seeds, so held-out accuracy is held out.
    Eval,
}

impl Split {
    /// The side a sentence belongs to: a fixed hash of its text (FNV-1a), one in five to
    /// evaluation.
    pub fn of(text: &str) -> Split {
        let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        if h % 5 == 0 {
            Split::Eval
        } else {
            Split::Train
        }
    }
}

/// [`sentiment`] (or, `hard` false, [`sentiment_simple`]) drawn from one side of the
/// partition only: what `delta-worker gen-data --split` writes.
pub fn sentiment_split(n: usize, seed: u64, hard: bool, split: Split) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let e = example(&mut rng, hard);
        if Split::of(&e.text) == split {
            out.push(e);
        }
    }
    out
}

fn generate(n: usize, seed: u64, hard: bool) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| example(&mut rng, hard)).collect()
}

fn example(rng: &mut Rng, hard: bool) -> Example {
    let positive = rng.below(2) == 0;
    let negate = hard && rng.below(4) == 0;
    let pool = if positive != negate {
        POSITIVE
    } else {
        NEGATIVE
    };
    let adj = pool[rng.below(pool.len())];
    let adj = if negate {
        format!("not {adj}")
    } else {
        adj.to_owned()
    };
    let s = SUBJECTS[rng.below(SUBJECTS.len())];
    let frame = if hard {
        FRAMES[rng.below(FRAMES.len())]
    } else {
        FRAMES[0]
    };
    Example {
        text: frame.replace("{s}", s).replace("{a}", &adj),
        text_pair: None,
        label: if positive { "positive" } else { "negative" }.to_owned(),
    }
}

/// Writes examples as JSONL.
pub fn to_jsonl(examples: &[Example]) -> String {
    let mut out = String::new();
    for e in examples {
        let mut v = serde_json::json!({ "text": e.text, "label": e.label });
        if let Some(p) = &e.text_pair {
            v["text_pair"] = serde_json::Value::String(p.clone());
        }
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_errors_name_the_line() {
        let err = parse_jsonl(b"{\"text\":\"a\",\"label\":1}\nnot json\n", "train.jsonl")
            .err()
            .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("train.jsonl line 2: not JSON"));
        let err = parse_jsonl(b"{\"text\":\"a\",\"label\":1.5}\n", "t")
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("line 1") && e.contains("label")));
        assert!(parse_jsonl(b"\n\n", "t").is_err());
    }

    #[test]
    fn text_pairs_get_segment_ids() {
        let ex = parse_jsonl(
            b"{\"text\":\"the film\",\"text_pair\":\"was great\",\"label\":\"yes\"}\n",
            "t",
        )
        .unwrap();
        assert_eq!(ex[0].text_pair.as_deref(), Some("was great"));
        let tok = Tok::word_level(&sentiment_vocabulary(), 64).unwrap();
        let enc = tok.encode_all(&ex, &["yes".to_owned()]).unwrap();
        // [CLS] the film [SEP] was great [SEP]
        assert_eq!(enc[0].ids.len(), 7);
        assert_eq!(enc[0].type_ids, vec![0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(enc[0].label, Some(0));
        // Predictions accept examples without a label.
        let ex = parse_jsonl(b"{\"text\":\"the film\"}\n", "t").unwrap();
        assert_eq!(ex[0].label, "");
    }

    #[test]
    fn labels_sort_numerically_when_integers() {
        let ex = parse_jsonl(
            b"{\"text\":\"a\",\"label\":10}\n{\"text\":\"b\",\"label\":2}\n",
            "t",
        )
        .unwrap();
        assert_eq!(label_set(&ex), vec!["2".to_owned(), "10".to_owned()]);
    }

    #[test]
    fn generator_is_seeded_and_balanced() {
        for hard in [true, false] {
            let train = sentiment_split(2000, 1, hard, Split::Train);
            let eval = sentiment_split(400, 2, hard, Split::Eval);
            let seen: BTreeSet<&str> = train.iter().map(|e| e.text.as_str()).collect();
            assert!(eval.iter().all(|e| !seen.contains(e.text.as_str())));
            for split in [&train, &eval] {
                let positive = split.iter().filter(|e| e.label == "positive").count();
                assert!(positive > split.len() / 4 && positive < split.len() * 3 / 4);
            }
        }
        let a = sentiment(400, 7);
        assert_eq!(a, sentiment(400, 7));
        assert_ne!(a, sentiment(400, 8));
        let pos = a.iter().filter(|e| e.label == "positive").count();
        assert!((150..250).contains(&pos), "{pos} positives of 400");
        let tok = Tok::word_level(&sentiment_vocabulary(), 64).unwrap();
        for e in &a {
            let (ids, _) = tok.encode(&e.text, None).unwrap();
            assert!(!ids.contains(&1), "unknown word in {:?}", e.text);
        }
    }
}
