//! Tokenizers: Hugging Face `tokenizer.json` folders and GGUF files, with the special tokens and
//! chat template that come with them.
//!
//! [`Tokenizer`] wraps a [`tokenizers::Tokenizer`] and adds what a causal LM needs around it:
//! the BOS/EOS/PAD tokens, whether BOS is prepended, the chat template, and a streaming decoder
//! ([`TokenStream`]) for printing generated text as it comes.
//!
//! A GGUF file carries no `tokenizer.json`, only llama.cpp's metadata (vocabulary, merges, token
//! types, the name of the pre-tokenizer). [`Tokenizer::from_gguf`] rebuilds the tokenizer from
//! those the way transformers does (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), which
//! is what our parity tests compare against:
//!
//! | `tokenizer.ggml.model` | what is built |
//! |---|---|
//! | `gpt2` | byte-level BPE; the split regex comes from `tokenizer.ggml.pre` (below) |
//! | `llama` | SentencePiece-style BPE with byte fallback and `▁` for spaces; merges from the file, or rebuilt from the token scores when the file has none (TinyLlama, Mistral) |
//! | `llama` in a `gemma*` / `phi3` file | the same, with those families' space handling |
//!
//! Pre-tokenizer names (`tokenizer.ggml.pre`) transformers knows map to their split regex:
//! `llama3`/`llama-bpe`/`llama-v3`/`falcon3`/`dbrx`/`smaug-bpe`/... to Llama 3's, `qwen2`/
//! `deepseek-r1-qwen`/`megrez`/... to Qwen2's (one digit per token), `qwen35` to Qwen 3.5's,
//! `tekken` to Mistral Nemo's, `gpt-4o`/`llama4`/... to GPT-4o's. Every other name (`default`,
//! `gpt2`, `smollm`, `starcoder`, `deepseek-llm`, ...) gets GPT-2's byte-level regex, as in
//! transformers (llama.cpp itself uses other regexes for some of those; for SmolLM2 the results
//! agree because its vocabulary has no multi-digit tokens).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Map as JsonMap, Value as Json};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::AddedToken;

use super::chat_template::ChatTemplate;
use crate::{Error, Result};

/// Llama 3's split regex (also Falcon 3, DBRX, Pixtral, ...), as transformers writes it.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split regex: like Llama 3's but one digit per piece.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 3.5's split regex: Qwen2's with combining marks kept inside words.
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral's Tekken split regex.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's split regex (also Llama 4).
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex for a llama.cpp pre-tokenizer name, `None` for GPT-2's byte-level default.
/// The table is transformers' (`GGUF_PRE_TOKENIZER_SPLITS`), the reference our tests compare to.
pub fn pre_tokenizer_split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

/// A tokenizer with its special tokens and chat template.
///
/// ```no_run
/// use qlora::model::tokenizer::Tokenizer;
///
/// let tok = Tokenizer::from_hf_dir("models/SmolLM2-135M-Instruct")?;
/// let ids = tok.encode("Hello world", false)?;
/// assert_eq!(tok.decode(&ids, false)?, "Hello world");
/// # Ok::<(), qlora::Error>(())
/// ```
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from, for error messages ("GGUF metadata of x.gguf", a tokenizer.json path).
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
    add_bos_token: bool,
    /// Cached: tokenizers computes it by cloning the whole vocabulary.
    vocab_size: usize,
    chat_template: Option<ChatTemplate>,
    /// Why the model's chat template could not be compiled, reported by
    /// [`Tokenizer::require_chat_template`]; tokenizing still works without it.
    chat_template_error: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_token", &self.pad_token)
            .field("add_bos_token", &self.add_bos_token)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Special tokens and template read from `tokenizer_config.json` or GGUF metadata.
#[derive(Default)]
struct Extras {
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
    /// `Some` when the config says explicitly; then the post-processor is rebuilt from it.
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. No special tokens or chat template are known
    /// (they live in `tokenizer_config.json`; use [`Tokenizer::from_hf_dir`] for those).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = read_tokenizer_json(path)?;
        let source = path.display().to_string();
        Self::assemble(inner, source, Extras::default())
    }

    /// Loads a model folder: `tokenizer.json`, plus `tokenizer_config.json` (special tokens,
    /// `add_bos_token`, `chat_template`) and `chat_template.jinja` when present. As in
    /// transformers, `chat_template.jinja` wins over the config's template, and an explicit
    /// `add_bos_token`/`add_eos_token` in the config replaces tokenizer.json's post-processor.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(Error::tokenizer(
                dir.display().to_string(),
                "no tokenizer.json in this folder; download the model's tokenizer files \
                 (tokenizer.json, tokenizer_config.json) next to its weights",
            ));
        }
        let inner = read_tokenizer_json(&tokenizer_path)?;
        let mut extras = Extras::default();

        let config_path = dir.join("tokenizer_config.json");
        if config_path.is_file() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            let config: Json = serde_json::from_str(&text).map_err(|e| {
                Error::config(&config_path, format!("does not parse: {e}; re-download it"))
            })?;
            extras = parse_tokenizer_config(&config);
        }
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            extras.chat_template =
                Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?);
        }
        Self::assemble(inner, tokenizer_path.display().to_string(), extras)
    }

    /// Builds the tokenizer described by a GGUF file's metadata (`content` is the already-read
    /// header of the file at `path`; `path` only names the file in errors).
    ///
    /// ```no_run
    /// use candle_core::quantized::gguf_file;
    /// use qlora::model::tokenizer::Tokenizer;
    ///
    /// let path = std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    /// let mut file = std::fs::File::open(path).unwrap();
    /// let content = gguf_file::Content::read(&mut file).unwrap();
    /// let tok = Tokenizer::from_gguf(path, &content)?;
    /// # Ok::<(), qlora::Error>(())
    /// ```
    pub fn from_gguf(path: &Path, content: &Content) -> Result<Self> {
        let source = format!("GGUF metadata of {}", path.display());
        let meta = GgufMeta {
            metadata: &content.metadata,
            source: &source,
        };
        let (inner, extras) = build_from_gguf(&meta)?;
        Self::assemble(inner, source, extras)
    }

    /// Reads the GGUF header of `path` and calls [`Tokenizer::from_gguf`].
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut file)
            .map_err(|e| Error::weights(path, format!("not a readable GGUF file: {e}")))?;
        Self::from_gguf(path, &content)
    }

    /// Wraps an already-built `tokenizers::Tokenizer` with the given special tokens.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        chat_template: Option<&str>,
    ) -> Result<Self> {
        let extras = Extras {
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
            chat_template: chat_template.map(str::to_string),
            ..Extras::default()
        };
        Self::assemble(inner, "in-memory tokenizer".to_string(), extras)
    }

    /// The common tail of every constructor: register the named special tokens, rebuild the
    /// post-processor when BOS/EOS adding was stated, compile the chat template.
    fn assemble(mut inner: tokenizers::Tokenizer, source: String, extras: Extras) -> Result<Self> {
        // transformers adds every named special token that is not yet an added token (keeping
        // its vocabulary id when it has one), so it is matched whole in text.
        let added: HashSet<String> = inner
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .collect();
        let missing: Vec<AddedToken> = [
            &extras.bos_token,
            &extras.eos_token,
            &extras.unk_token,
            &extras.pad_token,
        ]
        .into_iter()
        .flatten()
        .filter(|t| !added.contains(*t))
        .map(|t| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
        if !missing.is_empty() {
            inner.add_special_tokens(missing).map_err(|e| {
                Error::tokenizer(source.clone(), format!("cannot add special tokens: {e}"))
            })?;
        }

        let add_bos_token = if extras.add_bos_token.is_some() || extras.add_eos_token.is_some() {
            let add_bos = extras.add_bos_token.unwrap_or(false) && extras.bos_token.is_some();
            let add_eos = extras.add_eos_token.unwrap_or(false) && extras.eos_token.is_some();
            let processor = template_processor(
                &inner,
                extras.bos_token.as_deref().filter(|_| add_bos),
                extras.eos_token.as_deref().filter(|_| add_eos),
                &source,
            )?;
            inner.with_post_processor(Some(processor));
            add_bos
        } else {
            // Otherwise tokenizer.json's own post-processor decides; find out what it does.
            extras.bos_token.as_deref().is_some_and(|bos| {
                inner
                    .encode("", true)
                    .ok()
                    .and_then(|e| e.get_ids().first().copied())
                    .is_some_and(|first| inner.token_to_id(bos) == Some(first))
            })
        };

        let (chat_template, chat_template_error) = match &extras.chat_template {
            None => (None, None),
            Some(src) => {
                match ChatTemplate::new(
                    src,
                    extras.bos_token.as_deref(),
                    extras.eos_token.as_deref(),
                ) {
                    Ok(mut t) => {
                        if let Some(unk) = &extras.unk_token {
                            t = t.with_variable("unk_token", unk.clone());
                        }
                        if let Some(pad) = &extras.pad_token {
                            t = t.with_variable("pad_token", pad.clone());
                        }
                        (Some(t), None)
                    }
                    Err(e) => (None, Some(e.to_string())),
                }
            }
        };

        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            vocab_size,
            source,
            bos_token: extras.bos_token,
            eos_token: extras.eos_token,
            unk_token: extras.unk_token,
            pad_token: extras.pad_token,
            add_bos_token,
            chat_template,
            chat_template_error,
        })
    }

    /// Token ids of `text`. With `add_special_tokens` the post-processor adds what the model
    /// expects around a sequence (BOS for Llama-style models; nothing for SmolLM2 or Qwen2).
    /// Special tokens written in `text` (like `<|im_start|>`) are always matched whole.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// [`Tokenizer::encode`] for many texts at once (in parallel).
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        add_special_tokens: bool,
    ) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings = self
            .inner
            .encode_batch(inputs, add_special_tokens)
            .map_err(|e| self.err(format!("cannot encode texts: {e}")))?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of `ids`; `skip_special_tokens` leaves out special tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(format!("cannot decode ids: {e}")))
    }

    /// A streaming decoder over this tokenizer; see [`TokenStream`].
    pub fn stream(&self, skip_special_tokens: bool) -> TokenStream<'_> {
        TokenStream::new(self, skip_special_tokens)
    }

    /// The id of a token string (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, in the vocabulary's own spelling (`Ġ`/`▁` for spaces).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The end-of-sequence token, if known (generation stops on it).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The padding token, if the model names one.
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// The unknown token, if the model names one.
    pub fn unk_token(&self) -> Option<&str> {
        self.unk_token.as_deref()
    }

    /// Id of [`Tokenizer::bos_token`].
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Id of [`Tokenizer::eos_token`].
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Id of [`Tokenizer::pad_token`].
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Whether `encode(text, true)` starts with the BOS token.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// The model's chat template, if it has one that compiled.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The chat template, or an error saying why there is none (absent, or failed to compile).
    pub fn require_chat_template(&self) -> Result<&ChatTemplate> {
        if let Some(t) = &self.chat_template {
            return Ok(t);
        }
        Err(match &self.chat_template_error {
            Some(e) => self.err(format!("the model's chat template cannot be used: {e}")),
            None => self.err(
                "the model has no chat template; set one with Tokenizer::set_chat_template \
                 or use a plain prompt format",
            ),
        })
    }

    /// Replaces the chat template (compiled with this tokenizer's special tokens).
    pub fn set_chat_template(&mut self, source: &str) -> Result<()> {
        let mut t = ChatTemplate::new(source, self.bos_token(), self.eos_token())?;
        if let Some(unk) = &self.unk_token {
            t = t.with_variable("unk_token", unk.clone());
        }
        if let Some(pad) = &self.pad_token {
            t = t.with_variable("pad_token", pad.clone());
        }
        self.chat_template = Some(t);
        self.chat_template_error = None;
        Ok(())
    }

    /// Where this tokenizer came from (a path, or "GGUF metadata of <file>").
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::tokenizer(self.source.clone(), message)
    }

    /// tokenizers skips ids it does not know when decoding; an unknown id must be an error,
    /// not a silent gap in the text.
    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(self.err(format!(
                "token id {bad} is not in the vocabulary (size {})",
                self.vocab_size
            )));
        }
        Ok(())
    }
}

/// Decodes generated ids one at a time, returning only text that is complete.
///
/// Byte-level and byte-fallback tokenizers may split one UTF-8 character over several tokens;
/// decoding each alone would print `�`. The stream holds such pieces back until the character
/// is complete, and decodes each new token together with the previous ones so that decoders
/// which look at neighbours (spaces in `▁`-style vocabularies) give the same text as decoding
/// everything at once. Concatenating what [`TokenStream::step`] returns and then
/// [`TokenStream::finish`] gives exactly `decode(all_ids)` for normal text.
///
/// ```no_run
/// # fn demo(tok: &qlora::model::tokenizer::Tokenizer, ids: &[u32]) -> qlora::Result<()> {
/// let mut stream = tok.stream(true);
/// for &id in ids {
///     print!("{}", stream.step(id)?);
/// }
/// print!("{}", stream.finish()?);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// The ids still needed as context: those behind `prefix` and those not yet printed.
    ids: Vec<u32>,
    /// Decoded text of `ids[..prefix_len]`, all of it already returned.
    prefix: String,
    prefix_len: usize,
}

impl<'a> TokenStream<'a> {
    /// A stream over `tokenizer`; see [`Tokenizer::stream`].
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_len: 0,
        }
    }

    /// Feeds one id; returns the text it completes (often empty while a character is split).
    pub fn step(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        if text.ends_with('\u{FFFD}') {
            // Possibly an unfinished multi-byte character: wait for the next token.
            return Ok(String::new());
        }
        let new_text = self.new_suffix(&text);
        // Keep the tokens just printed as context for the next ones; drop older ones so each
        // step decodes only a few ids.
        self.ids.drain(..self.prefix_len);
        self.prefix_len = self.ids.len();
        self.prefix = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        Ok(new_text)
    }

    /// Returns whatever is still held back (an incomplete character comes out as `�`, so no
    /// text is lost) and resets the stream.
    pub fn finish(&mut self) -> Result<String> {
        if self.ids.len() == self.prefix_len {
            self.reset();
            return Ok(String::new());
        }
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let rest = self.new_suffix(&text);
        self.reset();
        Ok(rest)
    }

    /// Forgets all context, for starting a new sequence.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.prefix.clear();
        self.prefix_len = 0;
    }

    /// The part of `text` after what was already returned.
    fn new_suffix(&self, text: &str) -> String {
        if let Some(rest) = text.strip_prefix(self.prefix.as_str()) {
            return rest.to_string();
        }
        // The decoder rewrote earlier text (rare: e.g. a cleanup rule that depends on the next
        // token). What was printed cannot be taken back, so continue after the common part.
        let common = text
            .char_indices()
            .zip(self.prefix.chars())
            .take_while(|((_, a), b)| a == b)
            .last()
            .map(|((i, c), _)| i + c.len_utf8())
            .unwrap_or(0);
        text[common..].to_string()
    }
}

fn read_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    tokenizers::Tokenizer::from_str(&text).map_err(|e| {
        Error::tokenizer(
            path.display().to_string(),
            format!("does not parse: {e}; re-download it"),
        )
    })
}

/// A special token in tokenizer_config.json: a string or an AddedToken dict `{"content": ...}`.
fn config_token(config: &Json, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn parse_tokenizer_config(config: &Json) -> Extras {
    let chat_template = match config.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        // A list of named templates: transformers uses "default" unless asked for another.
        Some(Json::Array(list)) => {
            let named = |want: Option<&str>| {
                list.iter().find_map(|entry| {
                    let name = entry.get("name")?.as_str()?;
                    let template = entry.get("template")?.as_str()?;
                    (want.is_none() || want == Some(name)).then(|| template.to_string())
                })
            };
            named(Some("default")).or_else(|| named(None))
        }
        _ => None,
    };
    Extras {
        bos_token: config_token(config, "bos_token"),
        eos_token: config_token(config, "eos_token"),
        unk_token: config_token(config, "unk_token"),
        pad_token: config_token(config, "pad_token"),
        add_bos_token: config.get("add_bos_token").and_then(Json::as_bool),
        add_eos_token: config.get("add_eos_token").and_then(Json::as_bool),
        chat_template,
    }
}

/// transformers' `update_post_processor`: `[BOS] $A [EOS]` with whichever of the two is on.
fn template_processor(
    inner: &tokenizers::Tokenizer,
    bos: Option<&str>,
    eos: Option<&str>,
    source: &str,
) -> Result<PostProcessorWrapper> {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_tokens = JsonMap::new();
    let mut special = |token: &str, type_id: u32| -> Result<Json> {
        let id = inner.token_to_id(token).ok_or_else(|| {
            Error::tokenizer(
                source,
                format!("special token {token:?} is not in the vocabulary"),
            )
        })?;
        special_tokens.insert(
            token.to_string(),
            json!({"id": token, "ids": [id], "tokens": [token]}),
        );
        Ok(json!({"SpecialToken": {"id": token, "type_id": type_id}}))
    };
    for (seq, type_id, list) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
        if let Some(bos) = bos {
            list.push(special(bos, type_id)?);
        }
        list.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if let Some(eos) = eos {
            list.push(special(eos, type_id)?);
        }
    }
    let pair: Vec<Json> = single.iter().cloned().chain(pair).collect();
    let processor = json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    });
    serde_json::from_value(processor)
        .map_err(|e| Error::tokenizer(source, format!("cannot build the post-processor: {e}")))
}

/// Typed access to GGUF metadata, with errors that name the key and the file.
struct GgufMeta<'a> {
    metadata: &'a HashMap<String, Value>,
    source: &'a str,
}

impl GgufMeta<'_> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::tokenizer(self.source, message)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| {
            self.err(format!(
                "missing key `{key}`; this GGUF has no usable tokenizer, use a tokenizer.json instead"
            ))
        })
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    fn int(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_as_i64(v)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "an integer", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => value_as_i64(v)
                .map(|i| Some(i != 0))
                .ok_or_else(|| self.wrong_type(key, "a boolean", v)),
        }
    }

    fn array<'v>(&self, key: &str, value: &'v Value) -> Result<&'v [Value]> {
        match value {
            Value::Array(items) => Ok(items),
            other => Err(self.wrong_type(key, "an array", other)),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        self.array(key, value)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.wrong_type(&format!("{key}[{i}]"), "a string", other)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        self.array(key, value)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                value_as_i64(v)
                    .ok_or_else(|| self.wrong_type(&format!("{key}[{i}]"), "an integer", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        self.array(key, value)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                value_as_f64(v)
                    .ok_or_else(|| self.wrong_type(&format!("{key}[{i}]"), "a number", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        self.err(format!(
            "key `{key}` should be {expected}, found {:?}",
            found.value_type()
        ))
    }
}

fn value_as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn value_as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(f64::from(*x)),
        Value::F64(x) => Some(*x),
        other => value_as_i64(other).map(|i| i as f64),
    }
}

/// GPT-2's reversible byte → printable character table (`bytes_to_unicode`).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + extra).unwrap_or('\u{FFFD}');
            extra += 1;
            c
        };
    }
    table
}

/// Which of transformers' tokenizer builders a GGUF calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GgufKind {
    /// `tokenizer.ggml.model = "gpt2"`.
    ByteLevel,
    /// `"llama"`: SentencePiece BPE, Metaspace with a prefix space.
    SentencePiece,
    /// `"llama"` in a phi3 file: the prefix space comes from a normalizer.
    Phi3,
    /// `"llama"` in a gemma file: spaces replaced, no prefix space.
    Gemma,
}

fn build_from_gguf(meta: &GgufMeta<'_>) -> Result<(tokenizers::Tokenizer, Extras)> {
    let model_key = "tokenizer.ggml.model";
    let model = meta.string(model_key)?;
    let architecture = meta.string("general.architecture")?.unwrap_or("");
    let tokens_value = meta.require("tokenizer.ggml.tokens")?;
    let model = model.ok_or_else(|| {
        meta.err(format!(
            "missing key `{model_key}`; this GGUF has no usable tokenizer, use a tokenizer.json instead"
        ))
    })?;
    let kind = match (model, architecture) {
        ("gpt2", _) => GgufKind::ByteLevel,
        ("llama", "phi3") => GgufKind::Phi3,
        ("llama", "gemma" | "gemma2" | "gemma3") => GgufKind::Gemma,
        ("llama", _) => GgufKind::SentencePiece,
        (other, _) => {
            return Err(meta.err(format!(
                "`{model_key}` is {other:?}; supported tokenizers are \"gpt2\" (byte-level BPE) \
                 and \"llama\" (SentencePiece BPE); use the model's tokenizer.json instead"
            )))
        }
    };
    meta.array("tokenizer.ggml.tokens", tokens_value)?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?.unwrap_or_default();
    if tokens.is_empty() {
        return Err(meta.err("key `tokenizer.ggml.tokens` is empty"));
    }
    let token_types = meta.ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    let merges = meta.strings("tokenizer.ggml.merges")?;

    let token_at = |key: &str| -> Result<Option<String>> {
        match meta.int(key)? {
            None => Ok(None),
            Some(id) => usize::try_from(id)
                .ok()
                .and_then(|i| tokens.get(i))
                .map(|t| Some(t.to_string()))
                .ok_or_else(|| {
                    meta.err(format!(
                        "key `{key}` = {id} is outside the vocabulary ({} tokens)",
                        tokens.len()
                    ))
                }),
        }
    };
    let bos_token = token_at("tokenizer.ggml.bos_token_id")?;
    let eos_token = token_at("tokenizer.ggml.eos_token_id")?;
    let unk_token = token_at("tokenizer.ggml.unknown_token_id")?;
    let pad_token = token_at("tokenizer.ggml.padding_token_id")?;
    // llama.cpp adds BOS for SentencePiece vocabularies that do not say otherwise; transformers
    // follows it.
    let add_bos_token = meta
        .bool("tokenizer.ggml.add_bos_token")?
        .or((model == "llama").then_some(true));
    let add_eos_token = meta.bool("tokenizer.ggml.add_eos_token")?;
    let chat_template = meta.string("tokenizer.chat_template")?.map(str::to_string);

    // The vocabulary, in the spelling the model type uses.
    let vocab_tokens: Vec<String> = match kind {
        GgufKind::ByteLevel => {
            // Tokens are stored in GPT-2's byte alphabet; a few converters store some as raw
            // text, which must be respelled or they never match.
            let table = bytes_to_unicode();
            let alphabet: HashSet<char> = table.iter().copied().collect();
            tokens
                .iter()
                .map(|t| {
                    if t.chars().all(|c| alphabet.contains(&c)) {
                        t.to_string()
                    } else {
                        t.bytes().map(|b| table[b as usize]).collect()
                    }
                })
                .collect()
        }
        GgufKind::Gemma => tokens
            .iter()
            .map(|t| {
                // Gemma stores runs of spaces as real spaces; its tokenizer looks them up as ▁.
                if t.contains(' ') && t.trim().is_empty() {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.to_string()
                }
            })
            .collect(),
        GgufKind::SentencePiece | GgufKind::Phi3 => tokens.iter().map(|t| t.to_string()).collect(),
    };
    let mut vocab = JsonMap::new();
    for (id, token) in vocab_tokens.iter().enumerate() {
        // Later duplicates win, as in a Python dict built the same way.
        vocab.insert(token.clone(), json!(id));
    }

    let merge_pairs: Vec<(String, String)> = match &merges {
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        meta.err(format!(
                            "`tokenizer.ggml.merges[{i}]` = {m:?} is not two tokens separated by a space"
                        ))
                    })
            })
            .collect::<Result<_>>()?,
        None if kind == GgufKind::ByteLevel => {
            return Err(meta.err(
                "missing key `tokenizer.ggml.merges`, which a \"gpt2\" tokenizer needs",
            ))
        }
        None => {
            let scores: Vec<f64> = if kind == GgufKind::Gemma {
                // Gemma's scores do not follow its merge order; the file order does.
                (0..vocab_tokens.len()).map(|i| -(i as f64)).collect()
            } else {
                meta.floats("tokenizer.ggml.scores")?.ok_or_else(|| {
                    meta.err(
                        "missing key `tokenizer.ggml.scores`: the file has no merges and no \
                         scores to rebuild them from",
                    )
                })?
            };
            if scores.len() != vocab_tokens.len() {
                return Err(meta.err(format!(
                    "`tokenizer.ggml.scores` has {} entries for {} tokens",
                    scores.len(),
                    vocab_tokens.len()
                )));
            }
            merges_from_scores(&vocab_tokens, &scores)
        }
    };
    let merges_json: Vec<Json> = merge_pairs.iter().map(|(a, b)| json!([a, b])).collect();

    let replace_space =
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "});
    let (normalizer, pre_tokenizer, decoder, model_json) = match kind {
        GgufKind::ByteLevel => {
            let pre = meta.string("tokenizer.ggml.pre")?.unwrap_or("default");
            let pre_tokenizer = match pre_tokenizer_split_regex(pre) {
                Some(regex) => json!({
                    "type": "Sequence",
                    "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
                    ],
                }),
                None => {
                    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
                }
            };
            (
                Json::Null,
                pre_tokenizer,
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                json!({
                    "type": "BPE", "dropout": null, "unk_token": null,
                    "continuing_subword_prefix": "", "end_of_word_suffix": "",
                    "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab, "merges": merges_json,
                }),
            )
        }
        GgufKind::SentencePiece | GgufKind::Phi3 => {
            let sentencepiece_model = json!({
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges_json,
            });
            let decoder = json!({"type": "Sequence", "decoders": [
                replace_space,
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]});
            if kind == GgufKind::Phi3 {
                let normalizer = json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
                ]});
                (normalizer, Json::Null, decoder, sentencepiece_model)
            } else {
                let pre = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false});
                (Json::Null, pre, decoder, sentencepiece_model)
            }
        }
        GgufKind::Gemma => (
            json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
            json!({"type": "Sequence", "decoders": [replace_space, {"type": "ByteFallback"}, {"type": "Fuse"}]}),
            json!({
                "type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges_json,
            }),
        ),
    };

    // Added tokens, in transformers' order: the tokenizer class's default special tokens,
    // control tokens (special), user-defined tokens (not special). Each keeps its vocabulary
    // id. Defaults absent from the vocabulary are skipped (transformers would append them as
    // new ids past the model's embedding table).
    let defaults: &[&str] = match kind {
        GgufKind::ByteLevel => &["<|endoftext|>"],
        GgufKind::SentencePiece | GgufKind::Phi3 => &["<unk>", "<s>", "</s>"],
        GgufKind::Gemma => &["<unk>", "<bos>", "<eos>", "<pad>", "<mask>"],
    };
    let id_of = |token: &str| vocab.get(token).and_then(Json::as_u64);
    let mut added: Vec<(u64, String, bool)> = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |token: &str, special: bool, added: &mut Vec<(u64, String, bool)>| {
        if let Some(id) = id_of(token) {
            if seen.insert(token.to_string()) {
                added.push((id, token.to_string(), special));
            }
        }
    };
    for token in defaults {
        add(token, true, &mut added);
    }
    let byte_alphabet: HashSet<char> = bytes_to_unicode().iter().copied().collect();
    for (token, &ty) in tokens.iter().zip(&token_types) {
        // In a byte-level vocabulary a "control" token outside the byte alphabet is a llama.cpp
        // mislabel; transformers skips it, and so do we.
        let spelled =
            kind != GgufKind::ByteLevel || token.chars().all(|c| byte_alphabet.contains(&c));
        if ty == token_type::CONTROL && spelled {
            add(token, true, &mut added);
        }
    }
    for (token, &ty) in tokens.iter().zip(&token_types) {
        if ty == token_type::USER_DEFINED {
            add(token, false, &mut added);
        }
    }
    let added_json: Vec<Json> = added
        .iter()
        .map(|(id, content, special)| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": special,
            })
        })
        .collect();

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_json,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": decoder,
        "model": model_json,
    });
    let inner: tokenizers::Tokenizer = serde_json::from_value(tokenizer_json)
        .map_err(|e| meta.err(format!("the tokenizer it describes cannot be built: {e}")))?;

    let extras = Extras {
        bos_token,
        eos_token,
        unk_token,
        pad_token,
        // Always rebuild the post-processor for a GGUF (transformers' classes start from an
        // empty template), so absent flags mean "do not add".
        add_bos_token: Some(add_bos_token.unwrap_or(false)),
        add_eos_token: Some(add_eos_token.unwrap_or(false)),
        chat_template,
    };
    Ok((inner, extras))
}

/// Rebuilds BPE merges from a SentencePiece vocabulary and its scores, exactly as transformers'
/// `generate_merges(vocab, vocab_scores)`: every split of a token into two vocabulary tokens
/// is a merge, ranked by the merged token's score (best first), ties broken by the longer left
/// piece, then the longer right piece, then the order found.
pub fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    // token -> id, later duplicates winning (a Python dict comprehension).
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.insert(t.as_str(), i);
    }
    // token -> score in first-seen order with the last score (dict(zip(tokens, scores))).
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    for (t, &s) in tokens.iter().zip(scores) {
        if score_of.insert(t.as_str(), s).is_none() {
            order.push(t.as_str());
        }
    }

    struct Candidate<'t> {
        left: &'t str,
        right: &'t str,
        score: f64,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges: Vec<Candidate<'_>> = Vec::new();
    for token in order {
        let score = score_of[token];
        let mut local: Vec<Candidate<'_>> = Vec::new();
        // Split at every character boundary (Python slices by code point).
        for (index, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(index);
            if ids.contains_key(left) && ids.contains_key(right) {
                local.push(Candidate {
                    left,
                    right,
                    score,
                    left_chars: left.chars().count(),
                    right_chars: right.chars().count(),
                });
            }
        }
        local.sort_by_key(|c| (ids[c.left], ids[c.right]));
        merges.extend(local);
    }
    // sorted(..., key=(score, len(l), len(r)), reverse=True): stable, so equal keys keep order.
    merges.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges
        .into_iter()
        .map(|c| (c.left.to_string(), c.right.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;

    /// A byte-level BPE over the words "hello" and "world" with two special tokens, in the
    /// format `tokenizer.json` files use.
    fn tiny_byte_level_json() -> String {
        let table = bytes_to_unicode();
        let mut vocab = JsonMap::new();
        vocab.insert("<|endoftext|>".into(), json!(0));
        vocab.insert("<|im_end|>".into(), json!(1));
        for (i, c) in table.iter().enumerate() {
            vocab.insert(c.to_string(), json!(2 + i));
        }
        let merges = [
            ("h", "e"),
            ("l", "l"),
            ("he", "ll"),
            ("hell", "o"),
            ("Ġ", "w"),
            ("o", "r"),
            ("Ġw", "or"),
            ("l", "d"),
            ("Ġwor", "ld"),
        ];
        for (i, (a, b)) in merges.iter().enumerate() {
            vocab.insert(format!("{a}{b}"), json!(2 + 256 + i));
        }
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
                {"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()},
        })
        .to_string()
    }

    fn tiny_byte_level() -> Tokenizer {
        let inner = tokenizers::Tokenizer::from_str(&tiny_byte_level_json()).unwrap();
        Tokenizer::from_parts(inner, None, Some("<|im_end|>"), None).unwrap()
    }

    #[test]
    fn byte_level_encode_decode_roundtrip() {
        let tok = tiny_byte_level();
        let ids = tok.encode("hello world", false).unwrap();
        assert_eq!(
            ids.iter()
                .map(|&i| tok.id_to_token(i).unwrap())
                .collect::<Vec<_>>(),
            ["hello", "Ġworld"]
        );
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello world");

        let ids = tok.encode("hello<|im_end|>", false).unwrap();
        assert_eq!(ids.last(), Some(&1));
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello");
        assert_eq!(tok.eos_token_id(), Some(1));
        assert_eq!(tok.vocab_size(), 2 + 256 + 9);

        let batch = tok.encode_batch(&["hello", "world"], false).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0], tok.encode("hello", false).unwrap());
    }

    #[test]
    fn decode_rejects_ids_outside_the_vocabulary() {
        let tok = tiny_byte_level();
        let err = tok.decode(&[5, 100_000], false).unwrap_err().to_string();
        assert!(err.contains("100000"), "{err}");
    }

    #[test]
    fn stream_never_splits_a_multibyte_character() {
        let tok = tiny_byte_level();
        let text = "hello 🦀 world é!";
        let ids = tok.encode(text, false).unwrap();
        // The crab is four byte tokens: the stream must hold them back until complete.
        assert!(ids.len() > 8);
        let mut stream = tok.stream(false);
        let mut pieces = Vec::new();
        for &id in &ids {
            pieces.push(stream.step(id).unwrap());
        }
        pieces.push(stream.finish().unwrap());
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert!(pieces.iter().any(|p| p == "🦀"), "{pieces:?}");
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn stream_finish_flushes_an_incomplete_character() {
        let tok = tiny_byte_level();
        let ids = tok.encode("a🦀", false).unwrap();
        let mut stream = tok.stream(false);
        let mut out = String::new();
        // Leave off the crab's last byte.
        for &id in &ids[..ids.len() - 1] {
            out.push_str(&stream.step(id).unwrap());
        }
        assert_eq!(out, "a");
        let rest = stream.finish().unwrap();
        assert!(rest.contains('\u{FFFD}'), "{rest:?}");
    }

    /// A SentencePiece-style vocabulary as a "llama" GGUF stores it: byte tokens, scores, no
    /// merges.
    fn llama_gguf_metadata() -> HashMap<String, Value> {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2i32, 3, 3];
        let mut scores = vec![0f32, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (i, piece) in [
            "▁", "h", "e", "l", "o", "ll", "▁h", "▁he", "llo", "▁hello", "<tool>",
        ]
        .iter()
        .enumerate()
        {
            tokens.push(piece.to_string());
            types.push(if *piece == "<tool>" { 4 } else { 1 });
            scores.push(-(i as f32));
        }
        let mut m = HashMap::new();
        m.insert("general.architecture".into(), Value::String("llama".into()));
        m.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        );
        m.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        );
        m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        m.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
        m.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
        m.insert(
            "tokenizer.chat_template".into(),
            Value::String(
                "{% for m in messages %}{{ bos_token }}[INST] {{ m.content }} [/INST]{% endfor %}"
                    .into(),
            ),
        );
        m
    }

    fn content(metadata: HashMap<String, Value>) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn llama_gguf_with_byte_fallback() {
        let tok =
            Tokenizer::from_gguf(Path::new("tiny.gguf"), &content(llama_gguf_metadata())).unwrap();
        assert!(tok.add_bos_token());
        assert_eq!(tok.bos_token(), Some("<s>"));
        let ids = tok.encode("hello", true).unwrap();
        let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(pieces, ["<s>", "▁hello"]);
        // "é" is not in the vocabulary: byte fallback gives its two UTF-8 bytes.
        let ids = tok.encode("hello é", false).unwrap();
        let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(pieces, ["▁hello", "▁", "<0xC3>", "<0xA9>"]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello é");

        // Streaming over the split "é" and the leading-space strip.
        let mut stream = tok.stream(true);
        let mut out = Vec::new();
        for &id in &tok.encode("hello é hello", true).unwrap() {
            out.push(stream.step(id).unwrap());
        }
        out.push(stream.finish().unwrap());
        assert_eq!(out.concat(), "hello é hello");
        assert!(out.iter().all(|p| !p.contains('\u{FFFD}')));

        let rendered = tok
            .require_chat_template()
            .unwrap()
            .render(&[super::super::chat_template::Message::user("hi")], false)
            .unwrap();
        assert_eq!(rendered, "<s>[INST] hi [/INST]");
    }

    /// The same vocabulary written as a GGUF with gguf-py and loaded by transformers 5.24
    /// (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) gave these ids and decodings.
    #[test]
    fn llama_gguf_matches_transformers() {
        let tok =
            Tokenizer::from_gguf(Path::new("tiny.gguf"), &content(llama_gguf_metadata())).unwrap();
        let cases: &[(&str, &[u32], &str, &str)] = &[
            ("hello", &[1, 268], "<s> hello", "hello"),
            (
                "hello é",
                &[1, 268, 259, 198, 172],
                "<s> hello é",
                "hello é",
            ),
            (" hello", &[1, 268], "<s> hello", "hello"),
            (
                "hello  hello",
                &[1, 268, 259, 268],
                "<s> hello  hello",
                "hello  hello",
            ),
            ("<s>hello", &[1, 1, 260, 261, 267], "<s><s>hello", "hello"),
            (
                "hello<tool>hello",
                &[1, 268, 269, 260, 261, 267],
                "<s> hello<tool>hello",
                "hello<tool>hello",
            ),
            (
                "\nhello",
                &[1, 259, 13, 260, 261, 267],
                "<s> \nhello",
                "\nhello",
            ),
            ("", &[1], "<s>", ""),
        ];
        for &(text, ids, decoded, decoded_skip) in cases {
            assert_eq!(tok.encode(text, true).unwrap(), ids, "{text:?}");
            assert_eq!(tok.decode(ids, false).unwrap(), decoded, "{text:?}");
            assert_eq!(tok.decode(ids, true).unwrap(), decoded_skip, "{text:?}");
        }
        assert_eq!(tok.vocab_size(), 270);
    }

    #[test]
    fn merges_from_scores_matches_transformers_order() {
        // Checked against transformers' generate_merges on the same input.
        let tokens: Vec<String> = ["a", "b", "ab", "ba", "aba", "▁", "▁a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, -1.0, -1.0, -2.0, 0.0, -0.5];
        let merges = merges_from_scores(&tokens, &scores);
        let got: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            got,
            [("▁", "a"), ("a", "b"), ("b", "a"), ("ab", "a"), ("a", "ba")]
        );
    }

    #[test]
    fn gguf_errors_name_the_key_and_file() {
        let mut m = llama_gguf_metadata();
        m.remove("tokenizer.ggml.tokens");
        let err = Tokenizer::from_gguf(Path::new("broken.gguf"), &content(m))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer.ggml.tokens") && err.contains("broken.gguf"),
            "{err}"
        );

        let mut m = llama_gguf_metadata();
        m.remove("tokenizer.ggml.scores");
        let err = Tokenizer::from_gguf(Path::new("noscores.gguf"), &content(m))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer.ggml.scores") && err.contains("noscores.gguf"),
            "{err}"
        );

        let mut m = llama_gguf_metadata();
        m.insert("tokenizer.ggml.model".into(), Value::String("rwkv".into()));
        let err = Tokenizer::from_gguf(Path::new("x.gguf"), &content(m))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rwkv"), "{err}");

        let mut m = llama_gguf_metadata();
        m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(999_999));
        let err = Tokenizer::from_gguf(Path::new("x.gguf"), &content(m))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bos_token_id"), "{err}");

        let mut m = llama_gguf_metadata();
        m.insert("tokenizer.ggml.tokens".into(), Value::U32(3));
        let err = Tokenizer::from_gguf(Path::new("x.gguf"), &content(m))
            .unwrap_err()
            .to_string();
        assert!(err.contains("should be an array"), "{err}");
    }

    #[test]
    fn pre_tokenizer_names() {
        assert_eq!(pre_tokenizer_split_regex("llama-bpe"), Some(LLAMA3_SPLIT));
        assert_eq!(pre_tokenizer_split_regex("qwen2"), Some(QWEN2_SPLIT));
        assert_eq!(pre_tokenizer_split_regex("smollm"), None);
        assert_eq!(pre_tokenizer_split_regex("default"), None);
    }

    #[test]
    fn hf_dir_reads_config_and_jinja_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), tiny_byte_level_json()).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            json!({
                "bos_token": {"content": "<|endoftext|>", "lstrip": false},
                "eos_token": "<|im_end|>",
                "add_bos_token": true,
                "chat_template": [
                    {"name": "tool_use", "template": "TOOLS"},
                    {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"},
                ],
            })
            .to_string(),
        )
        .unwrap();
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(tok.bos_token_id(), Some(0));
        assert_eq!(tok.eos_token_id(), Some(1));
        assert_eq!(tok.encode("hello", true).unwrap()[0], 0);
        let msgs = [super::super::chat_template::Message::user("x")];
        assert_eq!(
            tok.chat_template().unwrap().render(&msgs, false).unwrap(),
            "<|endoftext|>x"
        );

        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(
            tok.chat_template().unwrap().render(&msgs, false).unwrap(),
            "J<|im_end|>"
        );
    }

    #[test]
    fn bad_files_give_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("does not parse"),
            "{err}"
        );

        let err = Tokenizer::from_file(dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");

        let err = Tokenizer::from_hf_dir(dir.path().join("nowhere"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nowhere") && err.contains("tokenizer.json"),
            "{err}"
        );

        // A chat template that does not compile leaves the tokenizer usable and says why.
        let inner = tokenizers::Tokenizer::from_str(&tiny_byte_level_json()).unwrap();
        let tok = Tokenizer::from_parts(inner, None, None, Some("{% if %}")).unwrap();
        assert!(tok.chat_template().is_none());
        let err = tok.require_chat_template().unwrap_err().to_string();
        assert!(err.contains("chat template"), "{err}");
    }
}
