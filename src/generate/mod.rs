//! Text generation: greedy and sampled decoding with a KV cache, stop conditions, streaming,
//! and batches of prompts (left-padded, as transformers' `generate` pads decoder-only models).

pub mod prefix;
pub mod sampling;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

pub use prefix::{PrefixCache, PrefixCacheStats};
use sampling::Sampler;

use crate::model::{KvCache, Message, Model};
use crate::{Error, Result};

/// How to generate, with transformers' names and defaults where it has them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// 0 means greedy decoding; otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Sample only among the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Sample only from the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f64>,
    /// > 1 discourages tokens already in the prompt or output (transformers' rule).
    pub repetition_penalty: f32,
    /// Seed of the sampler; the same seed gives the same text.
    pub seed: u64,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Extra token ids that end generation, besides the model's eos ids.
    pub eos_token_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 42,
            stop: vec![],
            eos_token_ids: vec![],
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of at most `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            ..Self::default()
        }
    }

    /// Sampling at `temperature` (with `seed`).
    pub fn sampled(max_new_tokens: usize, temperature: f64, seed: u64) -> Self {
        Self {
            max_new_tokens,
            temperature,
            seed,
            ..Self::default()
        }
    }

    /// Sets `max_new_tokens`.
    pub fn max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }
    /// Sets the temperature (0 = greedy).
    pub fn temperature(mut self, t: f64) -> Self {
        self.temperature = t;
        self
    }
    /// Sets top-k.
    pub fn top_k(mut self, k: usize) -> Self {
        self.top_k = Some(k);
        self
    }
    /// Sets top-p.
    pub fn top_p(mut self, p: f64) -> Self {
        self.top_p = Some(p);
        self
    }
    /// Sets the repetition penalty.
    pub fn repetition_penalty(mut self, p: f32) -> Self {
        self.repetition_penalty = p;
        self
    }
    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Adds a stop string.
    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop.push(s.into());
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1".into());
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An eos token or a stop string (OpenAI's "stop").
    Stop,
    /// `max_new_tokens` reached (OpenAI's "length").
    Length,
    /// The caller stopped the row (e.g. a server's client went away).
    Cancelled,
}

/// One sequence of a batch for [`Model::generate_rows`]: its prompt ids and how to generate it.
#[derive(Debug, Clone)]
pub struct BatchRow {
    pub prompt: Vec<u32>,
    pub config: GenerationConfig,
}

/// What a [`Model::generate_rows`] callback wants done with a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowControl {
    Continue,
    /// Stop generating this row now; its output so far is kept, with finish reason `Cancelled`.
    Cancel,
}

/// The result of generating from one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationOutput {
    /// The generated text (without the prompt, eos, or the stop string).
    pub text: String,
    /// The generated token ids (without eos).
    pub token_ids: Vec<u32>,
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// Per-row decoding state.
struct Row {
    config: GenerationConfig,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    text: String,
    emitted: usize,
    finish: Option<FinishReason>,
    sampler: Sampler,
}

impl Row {
    /// Decodes the output so far; returns true when a stop string appeared (text is cut there).
    fn update_text(&mut self, model: &Model, stop: &[String]) -> Result<bool> {
        let text = model.tokenizer.decode(&self.generated, true)?;
        // A byte-level token may end inside a UTF-8 character: hold the partial char back.
        let text = text.trim_end_matches('\u{FFFD}').to_string();
        let hit = stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min();
        self.text = match hit {
            Some(at) => text[..at].to_string(),
            None => text,
        };
        Ok(hit.is_some())
    }

    /// Text that can be shown now: all of it when finished, otherwise what cannot still turn
    /// out to be the start of a stop string.
    fn ready_text(&self, stop: &[String]) -> &str {
        let mut end = self.text.len();
        if self.finish.is_none() {
            let hold = stop
                .iter()
                .map(|s| s.len().saturating_sub(1))
                .max()
                .unwrap_or(0);
            end = end.saturating_sub(hold);
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
        }
        &self.text[self.emitted.min(end)..end]
    }
}

impl Model {
    /// Generates a continuation of `prompt` (the text is used as is; see
    /// [`Model::generate_chat`] for chat models).
    pub fn generate(&self, prompt: &str, config: &GenerationConfig) -> Result<GenerationOutput> {
        let mut out = self.generate_batch_with(&[prompt], config, |_, _| {})?;
        Ok(out.remove(0))
    }

    /// Renders `messages` with the chat template (adding the assistant turn) and generates.
    pub fn generate_chat(
        &self,
        messages: &[Message],
        config: &GenerationConfig,
    ) -> Result<GenerationOutput> {
        let prompt = self.apply_chat_template(messages, true)?;
        self.generate(&prompt, config)
    }

    /// Like [`Model::generate`], calling `on_text` with each new piece of text as it is ready.
    pub fn generate_stream(
        &self,
        prompt: &str,
        config: &GenerationConfig,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerationOutput> {
        let mut out = self.generate_batch_with(&[prompt], config, |_, t| on_text(t))?;
        Ok(out.remove(0))
    }

    /// Generates for several prompts at once (left padding plus an attention mask), which is
    /// faster than one at a time. Outputs are in the prompts' order.
    pub fn generate_batch<S: AsRef<str>>(
        &self,
        prompts: &[S],
        config: &GenerationConfig,
    ) -> Result<Vec<GenerationOutput>> {
        self.generate_batch_with(prompts, config, |_, _| {})
    }

    /// Renders each conversation with the chat template and generates for all of them at once.
    pub fn generate_chat_batch(
        &self,
        conversations: &[Vec<Message>],
        config: &GenerationConfig,
    ) -> Result<Vec<GenerationOutput>> {
        let prompts = conversations
            .iter()
            .map(|c| self.apply_chat_template(c, true))
            .collect::<Result<Vec<_>>>()?;
        self.generate_batch(&prompts, config)
    }

    /// Batched generation from token ids; `on_text(row, piece)` streams each row's text.
    pub fn generate_batch_with<S: AsRef<str>>(
        &self,
        prompts: &[S],
        config: &GenerationConfig,
        on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<GenerationOutput>> {
        let ids = prompts
            .iter()
            .map(|p| self.tokenizer.encode(p.as_ref(), true))
            .collect::<Result<Vec<_>>>()?;
        self.generate_ids(ids, config, on_text)
    }

    /// The core loop over already tokenised prompts.
    pub fn generate_ids(
        &self,
        prompts: Vec<Vec<u32>>,
        config: &GenerationConfig,
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<GenerationOutput>> {
        let rows = prompts
            .into_iter()
            .enumerate()
            .map(|(i, prompt)| BatchRow {
                prompt,
                config: GenerationConfig {
                    seed: config.seed.wrapping_add(i as u64),
                    ..config.clone()
                },
            })
            .collect();
        self.generate_rows(rows, |r, piece| {
            if !piece.is_empty() {
                on_text(r, piece);
            }
            RowControl::Continue
        })
    }

    /// Generates a batch whose rows each have their own settings (length, sampling, seed, stop
    /// strings) — what a server needs to batch unrelated requests. `on_step(row, new_text)` is
    /// called for every active row after every step (`new_text` may be empty) and may cancel it.
    pub fn generate_rows(
        &self,
        batch: Vec<BatchRow>,
        on_step: impl FnMut(usize, &str) -> RowControl,
    ) -> Result<Vec<GenerationOutput>> {
        self.generate_rows_reusing(batch, None, on_step)
    }

    /// Renders `messages` with the chat template and generates, starting from the longest
    /// prompt beginning `prefixes` holds and storing this prompt's keys and values there (see
    /// [`PrefixCache`]).
    pub fn generate_chat_reusing(
        &self,
        messages: &[Message],
        config: &GenerationConfig,
        prefixes: &PrefixCache,
    ) -> Result<GenerationOutput> {
        let prompt = self.apply_chat_template(messages, true)?;
        let row = BatchRow {
            prompt: self.tokenizer.encode(&prompt, true)?,
            config: config.clone(),
        };
        let mut out =
            self.generate_rows_reusing(vec![row], Some(prefixes), |_, _| RowControl::Continue)?;
        Ok(out.remove(0))
    }

    /// [`Model::generate_rows`], with a [`PrefixCache`] used when the batch has one row.
    ///
    /// Runs inside [`no_grad`](crate::ops::no_grad): a trainable adapter records no graph.
    pub fn generate_rows_reusing(
        &self,
        batch: Vec<BatchRow>,
        prefixes: Option<&PrefixCache>,
        on_step: impl FnMut(usize, &str) -> RowControl,
    ) -> Result<Vec<GenerationOutput>> {
        crate::ops::no_grad(|| self.generate_rows_untracked(batch, prefixes, on_step))
    }

    fn generate_rows_untracked(
        &self,
        batch: Vec<BatchRow>,
        prefixes: Option<&PrefixCache>,
        mut on_step: impl FnMut(usize, &str) -> RowControl,
    ) -> Result<Vec<GenerationOutput>> {
        for row in &batch {
            row.config.validate()?;
        }
        if batch.is_empty() {
            return Ok(vec![]);
        }
        if let Some(i) = batch.iter().position(|r| r.prompt.is_empty()) {
            return Err(Error::InvalidArgument(format!(
                "prompt {i} has no tokens; give it some text"
            )));
        }
        let device = self.device().clone();
        let mut rows: Vec<Row> = batch
            .into_iter()
            .map(|b| Row {
                sampler: Sampler::new(
                    b.config.seed,
                    b.config.temperature,
                    b.config.top_k,
                    b.config.top_p,
                    b.config.repetition_penalty,
                ),
                config: b.config,
                prompt: b.prompt,
                generated: vec![],
                text: String::new(),
                emitted: 0,
                finish: None,
            })
            .collect();
        for row in rows.iter_mut() {
            if row.config.max_new_tokens == 0 {
                row.finish = Some(FinishReason::Length);
            }
        }
        if rows.iter().all(|r| r.finish.is_some()) {
            return Ok(finish(rows));
        }
        let eos: Vec<Vec<u32>> = rows
            .iter()
            .map(|row| {
                self.eos_token_ids
                    .iter()
                    .chain(&row.config.eos_token_ids)
                    .copied()
                    .collect()
            })
            .collect();
        let pad_id = self
            .tokenizer
            .pad_token_id()
            .or(self.eos_token_ids.first().copied())
            .unwrap_or(0);

        // Rows asked for no tokens never enter the batch.
        let mut active: Vec<usize> = (0..rows.len())
            .filter(|&r| rows[r].finish.is_none())
            .collect();
        let longest = active.iter().map(|&r| rows[r].prompt.len()).max().unwrap();
        let padded = active.iter().any(|&r| rows[r].prompt.len() != longest);
        let mut mask: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                let pad = longest.saturating_sub(r.prompt.len());
                std::iter::repeat_n(0, pad)
                    .chain(std::iter::repeat_n(1, r.prompt.len()))
                    .collect()
            })
            .collect();
        let input: Vec<u32> = active
            .iter()
            .flat_map(|&r| {
                let prompt = &rows[r].prompt;
                std::iter::repeat_n(pad_id, longest - prompt.len()).chain(prompt.iter().copied())
            })
            .collect();
        let mut input = Tensor::from_vec(input, (active.len(), longest), &device)?;
        let mut cache = KvCache::new(self.decoder.layers.len());
        // One sequence: start from the longest cached beginning of its prompt.
        let prefixes = prefixes.filter(|_| active.len() == 1);
        if let Some(p) = prefixes {
            let prompt = &rows[active[0]].prompt;
            if let Some((shared, kv)) = p.lookup(prompt)? {
                cache = kv;
                input = Tensor::new(&prompt[shared..], &device)?.unsqueeze(0)?;
            }
        }
        let mut prefill = true;

        loop {
            let mask_t = if padded {
                let flat: Vec<u32> = active.iter().flat_map(|&r| mask[r].clone()).collect();
                let width = mask[active[0]].len();
                Some(Tensor::from_vec(flat, (active.len(), width), &device)?)
            } else {
                None
            };
            let logits = self
                .decoder
                .forward_last(&input, mask_t.as_ref(), Some(&mut cache))?
                .to_dtype(DType::F32)?;
            if let Some(p) = prefixes.filter(|_| prefill) {
                p.store(&rows[active[0]].prompt, cache.clone());
            }
            prefill = false;
            let mut next = Vec::with_capacity(active.len());
            for (slot, &r) in active.iter().enumerate() {
                let row = &mut rows[r];
                let mut l: Vec<f32> = logits.get(slot)?.to_vec1()?;
                let context: Vec<u32> = if row.config.repetition_penalty != 1.0 {
                    row.prompt.iter().chain(&row.generated).copied().collect()
                } else {
                    vec![]
                };
                let token = row.sampler.sample(&mut l, &context);
                if eos[r].contains(&token) {
                    row.finish = Some(FinishReason::Stop);
                } else {
                    row.generated.push(token);
                    let stop = std::mem::take(&mut row.config.stop);
                    let hit = row.update_text(self, &stop);
                    row.config.stop = stop;
                    if hit? {
                        row.finish = Some(FinishReason::Stop);
                    } else if row.generated.len() >= row.config.max_new_tokens {
                        row.finish = Some(FinishReason::Length);
                    }
                }
                let piece = row.ready_text(&row.config.stop).to_string();
                row.emitted += piece.len();
                if on_step(r, &piece) == RowControl::Cancel && row.finish.is_none() {
                    row.finish = Some(FinishReason::Cancelled);
                }
                next.push(token);
            }
            // Drop finished rows from the batch and the cache.
            let keep: Vec<u32> = active
                .iter()
                .enumerate()
                .filter(|(_, &r)| rows[r].finish.is_none())
                .map(|(slot, _)| slot as u32)
                .collect();
            if keep.is_empty() {
                break;
            }
            if keep.len() != active.len() {
                cache.select_rows(&keep)?;
                active = keep.iter().map(|&s| active[s as usize]).collect();
                next = keep.iter().map(|&s| next[s as usize]).collect();
            }
            for &r in &active {
                mask[r].push(1);
            }
            input = Tensor::from_vec(next, (active.len(), 1), &device)?;
        }
        Ok(finish(rows))
    }
}

fn finish(rows: Vec<Row>) -> Vec<GenerationOutput> {
    rows.into_iter()
        .map(|r| GenerationOutput {
            text: r.text,
            prompt_tokens: r.prompt.len(),
            finish_reason: r.finish.unwrap_or(FinishReason::Length),
            token_ids: r.generated,
        })
        .collect()
}
