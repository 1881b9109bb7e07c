//! Tiny random BERT bases (config, weights, word-level tokenizer) for tests, examples and
//! quick experiments: real code paths, millisecond steps.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::bert::{BaseWeights, BertConfig};
use crate::data::{Tok, sentiment_vocabulary};

/// A tiny BERT configuration over the sentiment generator's vocabulary.
pub fn config() -> BertConfig {
    BertConfig {
        vocab_size: sentiment_vocabulary().len() + 5,
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 128,
        max_position_embeddings: 64,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: "gelu".into(),
        model_type: "bert".into(),
        // The tiny test bases train without dropout: a few hundred steps on a 2-layer
        // random encoder have no capacity to spare.
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        classifier_dropout: None,
    }
}

/// Writes a tiny random base folder (`config.json`, `model.safetensors`,
/// `tokenizer.json`) seeded by `seed`.
pub fn write_base(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = config();
    let w = BaseWeights::random(cfg.clone(), seed, &Device::Cpu)?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg)?)?;
    candle_core::safetensors::save(&w.tensors, dir.join("model.safetensors"))?;
    Tok::word_level(&sentiment_vocabulary(), cfg.max_position_embeddings)?
        .save(&dir.join("tokenizer.json"))?;
    Ok(())
}
