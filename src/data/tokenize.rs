//! Records to token ids and labels, with TRL's completion-only semantics.
//!
//! With a chat template the whole conversation is rendered once and tokenised once (no special
//! tokens added: the template writes them). Assistant message `i` covers the text from the end of
//! `render(messages[..i], add_generation_prompt = true)` to the end of
//! `render(messages[..=i])` — its content and the end-of-turn tokens the template writes after
//! it (`<|im_end|>\n` for ChatML), so the model learns to stop. A token is trained on when it
//! starts inside such a span (byte offsets from the tokenizer); every other label is
//! [`IGNORE_INDEX`]. This equals TRL's mask, which tokenises the prompt and the prompt +
//! completion separately and trains on the tokens after the prompt, whenever the template's
//! renderings are prefixes of each other (checked; an error says so when they are not).

use super::config::DataConfig;
use super::record::Record;
use crate::model::{ChatTemplate, Message, Model};
use crate::train::IGNORE_INDEX;
use crate::{Error, Result};

/// One tokenised training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    /// Token ids (after truncation to `max_seq_len`).
    pub input_ids: Vec<u32>,
    /// The token id where the loss is taken, [`IGNORE_INDEX`] elsewhere; same length as
    /// `input_ids`. Not shifted: the loss shifts (`labels[t + 1]` is position `t`'s target).
    pub labels: Vec<i64>,
    /// Where the example came from, numbered as the report's messages number it: the 1-based
    /// line of a JSONL file, the 1-based data row of a CSV/Parquet file or DataFrame, or the
    /// 1-based position in a list of records.
    pub row: usize,
}

impl TokenizedExample {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of tokens the causal-LM loss counts for this example: labels other than
    /// [`IGNORE_INDEX`] after the first position (the shift leaves position 0 without a
    /// predictor), as transformers counts `num_items_in_batch`.
    pub fn num_target_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// The standard Alpaca prompt, used when no chat template renders Alpaca rows.
fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// Turns records into ids and labels for one model and configuration.
pub(crate) struct Encoder<'a> {
    /// The model's tokenizer without post-processor, truncation or padding, so offsets are the
    /// pre-tokenizer's own and nothing is added behind our back.
    tokenizer: tokenizers::Tokenizer,
    /// `Some` when records are rendered with the chat template.
    template: Option<&'a ChatTemplate>,
    /// Prepended to plain-text examples when the tokenizer adds BOS itself.
    bos: Option<u32>,
    eos: u32,
    system_prompt: Option<&'a str>,
}

impl<'a> Encoder<'a> {
    pub(crate) fn new(model: &'a Model, config: &'a DataConfig) -> Result<Self> {
        let tok = &model.tokenizer;
        let mut tokenizer = tok.inner().clone();
        tokenizer.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::tokenizer(tok.source(), e.to_string()))?;
        let eos = tok
            .eos_token_id()
            .or_else(|| model.eos_token_ids.first().copied())
            .ok_or_else(|| {
                Error::tokenizer(
                    tok.source(),
                    "the tokenizer has no end-of-sequence token; training data needs one to \
                     teach the model to stop",
                )
            })?;
        let template = if config.use_chat_template {
            tok.chat_template()
        } else {
            None
        };
        Ok(Self {
            tokenizer,
            template,
            bos: tok.bos_token_id().filter(|_| tok.add_bos_token()),
            eos,
            system_prompt: config.system_prompt.as_deref(),
        })
    }

    /// Whether records are rendered with the chat template.
    pub(crate) fn uses_template(&self) -> bool {
        self.template.is_some()
    }

    /// Ids and labels of one record (untruncated). Errors are row-level messages.
    pub(crate) fn encode(
        &self,
        record: &Record,
        row_system: Option<&str>,
    ) -> std::result::Result<(Vec<u32>, Vec<i64>), String> {
        let system = row_system.or(self.system_prompt);
        if let Some(template) = self.template {
            let mut messages = match record {
                Record::Text(text) => return self.encode_text(text),
                Record::Chat(m) => m.clone(),
                Record::PromptCompletion { prompt, completion } => {
                    vec![Message::user(prompt), Message::assistant(completion)]
                }
                Record::Alpaca {
                    instruction,
                    input,
                    output,
                } => {
                    let mut user = instruction.clone();
                    if !input.is_empty() {
                        user.push_str("\n\n");
                        user.push_str(input);
                    }
                    vec![Message::user(user), Message::assistant(output)]
                }
            };
            if let Some(s) = system {
                if messages.first().is_none_or(|m| m.role != "system") {
                    messages.insert(0, Message::system(s));
                }
            }
            return self.encode_conversation(template, &messages);
        }
        let with_system = |prompt: String| match system {
            Some(s) => format!("{s}\n\n{prompt}"),
            None => prompt,
        };
        match record {
            Record::Text(text) => self.encode_text(text),
            Record::PromptCompletion { prompt, completion } => {
                self.encode_pair(&with_system(prompt.clone()), completion)
            }
            Record::Alpaca {
                instruction,
                input,
                output,
            } => self.encode_pair(&with_system(alpaca_prompt(instruction, input)), output),
            Record::Chat(_) => Err(
                "a conversation needs a chat template and this model has none \
                                    (or DataConfig::use_chat_template is false); set one with \
                                    model.tokenizer.set_chat_template(..) or give \
                                    prompt/completion rows"
                    .to_string(),
            ),
        }
    }

    fn tokenize(&self, text: &str) -> std::result::Result<tokenizers::Encoding, String> {
        self.tokenizer
            .encode(text, false)
            .map_err(|e| format!("the tokenizer failed: {e}"))
    }

    /// Plain text: BOS (when the tokenizer adds it) + text + EOS, every token trained on.
    fn encode_text(&self, text: &str) -> std::result::Result<(Vec<u32>, Vec<i64>), String> {
        let enc = self.tokenize(text)?;
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend_from_slice(enc.get_ids());
        ids.push(self.eos);
        let labels = ids.iter().map(|&id| id as i64).collect();
        Ok((ids, labels))
    }

    /// Prompt and completion joined as text (TRL's non-conversational path): BOS (when the
    /// tokenizer adds it) + prompt + completion + EOS, trained on the completion and EOS.
    fn encode_pair(
        &self,
        prompt: &str,
        completion: &str,
    ) -> std::result::Result<(Vec<u32>, Vec<i64>), String> {
        let text = format!("{prompt}{completion}");
        let enc = self.tokenize(&text)?;
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        let mut labels: Vec<i64> = ids.iter().map(|_| IGNORE_INDEX).collect();
        for (&id, &(start, _)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            ids.push(id);
            labels.push(if start >= prompt.len() {
                id as i64
            } else {
                IGNORE_INDEX
            });
        }
        ids.push(self.eos);
        labels.push(self.eos as i64);
        Ok((ids, labels))
    }

    fn encode_conversation(
        &self,
        template: &ChatTemplate,
        messages: &[Message],
    ) -> std::result::Result<(Vec<u32>, Vec<i64>), String> {
        let render = |m: &[Message], gen: bool| {
            template
                .render(m, gen)
                .map_err(|e| format!("the chat template cannot render this conversation: {e}"))
        };
        let full = render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let prompt = render(&messages[..i], true)?;
            let upto = render(&messages[..=i], false)?;
            if !upto.starts_with(&prompt) || !full.starts_with(&upto) {
                return Err(format!(
                    "the chat template is not prefix-stable at message {} (assistant): the \
                     conversation rendered up to that message does not start with the prompt \
                     rendered before it (or is not a prefix of the whole conversation), so the \
                     assistant's tokens cannot be told apart. Templates that rewrite earlier \
                     turns cause this (and so can a conversation that starts with an assistant \
                     message); pass DataConfig::use_chat_template(false) or set a different \
                     template with model.tokenizer.set_chat_template(..)",
                    i + 1
                ));
            }
            spans.push((prompt.len(), upto.len()));
        }
        let enc = self.tokenize(&full)?;
        let ids = enc.get_ids().to_vec();
        let labels = ids
            .iter()
            .zip(enc.get_offsets())
            .map(|(&id, &(start, _))| {
                if spans.iter().any(|&(s, e)| start >= s && start < e) {
                    id as i64
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        Ok((ids, labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_count_skips_position_zero() {
        let ex = TokenizedExample {
            input_ids: vec![5, 6, 7, 8],
            labels: vec![5, IGNORE_INDEX, 7, 8],
            row: 1,
        };
        assert_eq!(ex.num_target_tokens(), 2);
        assert_eq!(ex.len(), 4);
    }

    #[test]
    fn alpaca_prompt_with_and_without_input() {
        assert!(
            alpaca_prompt("Do it.", "").ends_with("### Instruction:\nDo it.\n\n### Response:\n")
        );
        assert!(alpaca_prompt("Do it.", "x").contains("### Input:\nx\n\n### Response:\n"));
    }
}
