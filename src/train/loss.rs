//! The causal-LM loss — transformers' `ForCausalLMLoss` — computed from the final hidden states
//! in chunks of rows, so the `[tokens × vocab]` f32 logits never exist at once.
//!
//! transformers shifts the labels (`labels[t + 1]` is the target of position `t`; the last
//! position gets -100), flattens, and takes `cross_entropy(logits.float(), targets,
//! ignore_index=-100)` with reduction `mean` over the counted targets — or `sum / num_items_in_batch`
//! when the Trainer passes the token count of a whole accumulated batch.
//!
//! Only positions with a counted target go through the output head (completion-only training
//! skips most of the prompt). For each chunk the head runs on a detached copy of the chunk's
//! hidden rows; the loss and its gradient with respect to those rows,
//! `(softmax(logits) − onehot(target)) / N` pulled back through the head, are computed there and the
//! chunk's graph is dropped. The returned loss tensor is then `value + (s − s.detach())` with
//! `s = Σ hidden_rows · G`: its value is exactly the loss and its gradient with respect to the
//! hidden states is exactly `G`, so `loss.backward()` carries on into the decoder and the LoRA
//! matrices while holding only `[tokens × hidden]` extra. A head trained in full (PEFT's
//! `modules_to_save = ["lm_head"]`) gets its gradient the same way: each chunk's gradient with
//! respect to the head's variables is summed, and the loss carries a zero-valued term
//! `Σ W·G_W − detach` that hands exactly that sum to `loss.backward()`.

use candle_core::{DType, Module, Tensor, Var, D};

use crate::model::{Linear, LinearWeight};

use crate::{Error, Result};

/// The label value that marks a position as not counted (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;

/// Chunking and reduction options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossOptions {
    /// Rows (counted positions) per chunk; each chunk holds a few `[rows × vocab]` f32 tensors.
    pub chunk_rows: usize,
    /// transformers' `num_items_in_batch`: divide the summed loss by this instead of this batch's
    /// own token count (gradient accumulation over micro-batches of uneven token counts).
    pub num_items_in_batch: Option<usize>,
}

impl Default for LossOptions {
    fn default() -> Self {
        Self {
            chunk_rows: 128,
            num_items_in_batch: None,
        }
    }
}

impl LossOptions {
    /// Chunks of about 8M logits (32 MB of f32 per intermediate): 170 rows for SmolLM2's 49k
    /// vocabulary, 55 for Qwen2.5's 151k.
    pub fn for_vocab(vocab_size: usize) -> Self {
        Self {
            chunk_rows: ((8usize << 20) / vocab_size.max(1)).max(1),
            ..Self::default()
        }
    }

    /// Sets the rows per chunk.
    pub fn chunk_rows(mut self, rows: usize) -> Self {
        self.chunk_rows = rows;
        self
    }

    /// Sets `num_items_in_batch`.
    pub fn num_items_in_batch(mut self, n: Option<usize>) -> Self {
        self.num_items_in_batch = n;
        self
    }
}

/// The loss of one batch.
#[derive(Debug, Clone)]
pub struct LmLoss {
    /// Scalar f32 loss; differentiable with respect to the hidden states when they were tracked.
    pub loss: Tensor,
    /// The loss as a number (NaN when no target is counted and `num_items_in_batch` is unset,
    /// as torch's mean over zero elements).
    pub value: f32,
    /// Sum of the per-token negative log-likelihoods (for averaging evaluation losses over
    /// batches).
    pub sum: f64,
    /// Number of counted targets in this batch.
    pub num_tokens: usize,
}

/// Shifted, counted targets: flat row indices into `[B·T]` and their token ids.
fn counted_targets(labels: &Tensor, b: usize, t: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    if labels.dims() != [b, t] {
        return Err(Error::InvalidArgument(format!(
            "labels must be [batch, seq] = [{b}, {t}] like the hidden states, got {:?}",
            labels.dims()
        )));
    }
    let rows = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for (bi, row) in rows.iter().enumerate() {
        for (ti, &y) in row.iter().enumerate().skip(1) {
            if y == IGNORE_INDEX {
                continue;
            }
            if y < 0 || y > u32::MAX as i64 {
                return Err(Error::InvalidArgument(format!(
                    "label {y} at batch row {bi}, position {ti} is neither a token id nor {IGNORE_INDEX}"
                )));
            }
            positions.push((bi * t + ti - 1) as u32);
            targets.push(y as u32);
        }
    }
    Ok((positions, targets))
}

/// Whether the head's input gradient can be taken as `dlogits · W` without autograd: a frozen
/// (or dequantised) f32 weight on the CPU, nothing of the head trained.
fn direct_head(head: &Linear, head_vars: &[Tensor]) -> bool {
    head_vars.is_empty()
        && head.device().is_cpu()
        && head.compute_dtype() == DType::F32
        && matches!(head.weight(), LinearWeight::Dense(w) if w.dtype() == DType::F32)
}

/// Cross-entropy of one chunk of f32 logits `[rows, vocab]` against `targets`: the summed
/// negative log-likelihood, and when `want_grad` the gradient with respect to the logits,
/// `(softmax − onehot) · scale`.
///
/// On the CPU one kernel does it in two passes per row (max, then exponentials with their sum
/// accumulated in f64, as a 49k-term f32 sum would drift ~1e-5); elsewhere candle's ops do.
fn cross_entropy_chunk(
    logits: &Tensor,
    targets: &[u32],
    scale: f64,
    want_grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    let (rows, vocab) = logits.dims2()?;
    let dev = logits.device();
    if dev.is_cpu() {
        let logits = logits.contiguous()?;
        return Ok(crate::ops::fused::with_slice(
            &logits,
            "cross-entropy",
            |data| {
                let mut grad = if want_grad {
                    vec![0f32; rows * vocab]
                } else {
                    vec![]
                };
                let row_nll = |(i, g): (usize, Option<&mut [f32]>)| -> f64 {
                    let l = &data[i * vocab..(i + 1) * vocab];
                    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f64;
                    match g {
                        Some(g) => {
                            for (g, &x) in g.iter_mut().zip(l) {
                                let e = (x - max).exp();
                                *g = e;
                                sum += e as f64;
                            }
                            let k = (scale / sum) as f32;
                            for g in g.iter_mut() {
                                *g *= k;
                            }
                            g[targets[i] as usize] -= scale as f32;
                        }
                        None => sum = l.iter().map(|&x| (x - max).exp() as f64).sum(),
                    }
                    sum.ln() - (l[targets[i] as usize] - max) as f64
                };
                use rayon::prelude::*;
                let nll: Vec<f64> = if want_grad {
                    grad.par_chunks_mut(vocab)
                        .enumerate()
                        .map(|(i, g)| row_nll((i, Some(g))))
                        .collect()
                } else {
                    (0..rows)
                        .into_par_iter()
                        .map(|i| row_nll((i, None)))
                        .collect()
                };
                let grad = if want_grad {
                    Some(Tensor::from_vec(grad, (rows, vocab), dev)?)
                } else {
                    None
                };
                Ok((nll.iter().sum(), grad))
            },
        )?);
    }
    let tgt = Tensor::from_slice(targets, (rows, 1), dev)?;
    let diff = logits.broadcast_sub(&logits.max_keepdim(1)?)?;
    let exp = diff.exp()?;
    let sum_exp = exp.to_dtype(DType::F64)?.sum_keepdim(1)?;
    let picked = diff.gather(&tgt, 1)?.to_dtype(DType::F64)?;
    let nll = (sum_exp.log()? - picked)?.sum_all()?.to_scalar::<f64>()?;
    if !want_grad {
        return Ok((nll, None));
    }
    let softmax = exp.broadcast_div(&sum_exp.to_dtype(DType::F32)?)?;
    let minus_one = Tensor::full(-1f32, (rows, 1), dev)?;
    let grad = softmax
        .scatter_add(&tgt, &minus_one, 1)?
        .affine(scale, 0.0)?;
    Ok((nll, Some(grad)))
}

/// Mean cross-entropy of next-token prediction, as transformers' `ForCausalLMLoss`.
///
/// `hidden` is `[batch, seq, hidden]` (the decoder's final-norm output), `head` maps hidden rows
/// to logits, `labels` is `[batch, seq]` token ids with [`IGNORE_INDEX`] for positions that do not
/// count (any integer dtype). Position `t` is scored against `labels[t + 1]`.
pub fn causal_lm_loss(
    hidden: &Tensor,
    head: &Linear,
    labels: &Tensor,
    options: &LossOptions,
) -> Result<LmLoss> {
    let (b, t, h) = hidden.dims3().map_err(|_| {
        Error::InvalidArgument(format!(
            "hidden states must be [batch, seq, hidden], got {:?}",
            hidden.dims()
        ))
    })?;
    if options.chunk_rows == 0 {
        return Err(Error::InvalidArgument(
            "chunk_rows must be at least 1".into(),
        ));
    }
    let (positions, targets) = counted_targets(labels, b, t)?;
    let n = positions.len();
    let denom = options.num_items_in_batch.unwrap_or(n);
    let dev = hidden.device();
    let flat = hidden.reshape((b * t, h))?;
    let track = hidden.track_op() || !head.variables().is_empty();
    let max_target = targets.iter().copied().max();
    // One dequantisation for all chunks instead of two per chunk (forward and backward); the
    // f32 head lives only for this call.
    let head = &head.dequantized()?;

    let mut sum = 0f64;
    let mut grad_chunks = Vec::new();
    // The head's own trainable tensors and their gradients summed over chunks.
    let head_vars = if track { head.variables() } else { vec![] };
    let mut head_grads: Vec<Option<Tensor>> = vec![None; head_vars.len()];
    let direct = direct_head(head, &head_vars);
    for (pos, tgt) in positions
        .chunks(options.chunk_rows)
        .zip(targets.chunks(options.chunk_rows))
    {
        let c = pos.len();
        let idx = Tensor::from_slice(pos, c, dev)?;
        let rows = flat.detach().index_select(&idx, 0)?;
        // A frozen f32 head on the CPU: the input gradient is `dlogits · W`, computed directly;
        // otherwise the head's own backward runs from a leaf (a trainable copy needs it).
        let leaf = if track && !direct {
            Some(Var::from_tensor(&rows)?)
        } else {
            None
        };
        let x = leaf.as_ref().map_or(&rows, |v| v.as_tensor());
        let logits = head.forward(x)?.to_dtype(DType::F32)?;
        let vocab = logits.dim(D::Minus1)?;
        if let Some(m) = max_target.filter(|&m| m as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "label {m} is outside the vocabulary ({vocab} tokens)"
            )));
        }
        let (nll_sum, dlogits) =
            cross_entropy_chunk(&logits.detach(), tgt, 1.0 / denom as f64, track)?;
        sum += nll_sum;
        let Some(dlogits) = dlogits else { continue };
        if direct {
            grad_chunks.push(dlogits.matmul(&head.dense_weight()?)?);
            continue;
        }
        let leaf = leaf.ok_or_else(|| {
            Error::InvalidArgument("chunked loss: a tracked chunk without its input leaf".into())
        })?;
        let surrogate = (logits * dlogits)?.sum_all()?;
        let mut grads = surrogate.backward()?;
        let g = grads.remove(leaf.as_tensor()).ok_or_else(|| {
            Error::InvalidArgument(
                "the output head passes no gradient to its input (a fused op without backward?)"
                    .into(),
            )
        })?;
        grad_chunks.push(g);
        for (v, acc) in head_vars.iter().zip(head_grads.iter_mut()) {
            if let Some(g) = grads.remove(v) {
                *acc = Some(match acc.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
    }

    let value = (sum / denom as f64) as f32;
    let loss = if !track {
        Tensor::new(value, dev)?
    } else if n == 0 {
        // A tracked zero keeps every parameter in the gradient store (with zeros), as torch's
        // backward of a loss with no counted token does.
        flat.narrow(0, 0, 1)?
            .sum_all()?
            .to_dtype(DType::F32)?
            .affine(0.0, value as f64)?
    } else {
        let idx = Tensor::from_slice(&positions, n, dev)?;
        let g = Tensor::cat(&grad_chunks, 0)?;
        let mut s = (flat.index_select(&idx, 0)? * g)?.sum_all()?;
        for (v, g) in head_vars.iter().zip(&head_grads) {
            if let Some(g) = g {
                let term = (v * g)?.sum_all()?.to_dtype(s.dtype())?;
                s = (s + term)?;
            }
        }
        // Value: exactly `value` (s − s = 0); gradient with respect to the rows: exactly G.
        (&s - s.detach())?
            .to_dtype(DType::F32)?
            .affine(1.0, value as f64)?
    };
    Ok(LmLoss {
        loss,
        value,
        sum,
        num_tokens: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The plain candle composition over full logits, differentiable end to end.
    fn unchunked(hidden: &Tensor, w: &Tensor, labels: &[Vec<i64>]) -> Tensor {
        let (b, t, h) = hidden.dims3().unwrap();
        let mut pos = vec![];
        let mut tg = vec![];
        for (bi, row) in labels.iter().enumerate() {
            for (ti, &y) in row.iter().enumerate().skip(1) {
                if y != IGNORE_INDEX {
                    pos.push((bi * t + ti - 1) as u32);
                    tg.push(y as u32);
                }
            }
        }
        let n = pos.len();
        let rows = hidden
            .reshape((b * t, h))
            .unwrap()
            .index_select(&Tensor::from_slice(&pos, n, &Device::Cpu).unwrap(), 0)
            .unwrap();
        let logits = rows.matmul(&w.t().unwrap()).unwrap();
        candle_nn::loss::cross_entropy(&logits, &Tensor::from_slice(&tg, n, &Device::Cpu).unwrap())
            .unwrap()
    }

    #[test]
    fn chunked_matches_plain_autograd_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (b, t, h, v) = (2, 7, 16, 50);
        let hv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 0.5, (v, h), &dev).unwrap();
        let head = crate::model::Linear::dense(w.clone(), None);
        let labels = vec![
            vec![-100i64, -100, 3, 4, 5, -100, 9],
            vec![1, 2, 3, 49, -100, 0, 7],
        ];
        let lt = Tensor::new(labels.clone(), &dev).unwrap();
        let reference = unchunked(hv.as_tensor(), &w, &labels);
        let want = reference.to_scalar::<f32>().unwrap();
        let want_g = reference
            .backward()
            .unwrap()
            .get(hv.as_tensor())
            .unwrap()
            .clone();
        for rows in [1, 3, 1000] {
            let out = causal_lm_loss(
                hv.as_tensor(),
                &head,
                &lt,
                &LossOptions::default().chunk_rows(rows),
            )
            .unwrap();
            assert_eq!(out.num_tokens, 9);
            assert_eq!(out.loss.to_scalar::<f32>().unwrap(), out.value);
            assert!((out.value - want).abs() < 1e-5, "{} vs {want}", out.value);
            let g = out
                .loss
                .backward()
                .unwrap()
                .get(hv.as_tensor())
                .unwrap()
                .clone();
            let d = (g - &want_g).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
        }
    }

    #[test]
    fn a_trainable_head_gets_the_plain_autograd_gradient_over_any_chunking() {
        let dev = Device::Cpu;
        let (b, t, h, v) = (2, 7, 16, 50);
        let hv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h), &dev).unwrap()).unwrap();
        let wv = Var::from_tensor(&Tensor::randn(0f32, 0.5, (v, h), &dev).unwrap()).unwrap();
        let head = crate::model::Linear::dense(wv.as_tensor().clone(), None);
        let labels = vec![
            vec![-100i64, -100, 3, 4, 5, -100, 9],
            vec![1, 2, 3, 49, -100, 0, 7],
        ];
        let lt = Tensor::new(labels.clone(), &dev).unwrap();
        let reference = unchunked(hv.as_tensor(), wv.as_tensor(), &labels);
        let want = reference.backward().unwrap();
        for rows in [1, 4, 1000] {
            let out = causal_lm_loss(
                hv.as_tensor(),
                &head,
                &lt,
                &LossOptions::default().chunk_rows(rows),
            )
            .unwrap();
            let got = out.loss.backward().unwrap();
            for x in [hv.as_tensor(), wv.as_tensor()] {
                let d =
                    crate::ops::max_abs_diff(got.get(x).expect("a gradient"), want.get(x).unwrap());
                assert!(d < 1e-6, "chunk_rows {rows}: gradient differs by {d}");
            }
        }
    }

    #[test]
    fn untracked_input_gives_a_plain_value_and_bad_labels_are_named() {
        let dev = Device::Cpu;
        let hidden = Tensor::randn(0f32, 1.0, (1, 3, 4), &dev).unwrap();
        let head =
            crate::model::Linear::dense(Tensor::ones((5, 4), DType::F32, &dev).unwrap(), None);
        let all_ignored = Tensor::new(&[[-100i64, -100, -100]], &dev).unwrap();
        let out = causal_lm_loss(&hidden, &head, &all_ignored, &LossOptions::default()).unwrap();
        assert_eq!(out.num_tokens, 0);
        assert!(out.value.is_nan());
        let opts = LossOptions::default().num_items_in_batch(Some(4));
        let out = causal_lm_loss(&hidden, &head, &all_ignored, &opts).unwrap();
        assert_eq!(out.value, 0.0);
        // Ones head: every logit equal, so the loss is ln 5 per token.
        let labels = Tensor::new(&[[0i64, 1, 2]], &dev).unwrap();
        let out = causal_lm_loss(&hidden, &head, &labels, &LossOptions::default()).unwrap();
        assert!((out.value - 5f32.ln()).abs() < 1e-6);
        let bad = Tensor::new(&[[0i64, 7, 2]], &dev).unwrap();
        let err = causal_lm_loss(&hidden, &head, &bad, &LossOptions::default()).unwrap_err();
        assert!(err.to_string().contains("label 7"), "{err}");
        let neg = Tensor::new(&[[0i64, -5, 2]], &dev).unwrap();
        let err = causal_lm_loss(&hidden, &head, &neg, &LossOptions::default()).unwrap_err();
        assert!(err.to_string().contains("position 1"), "{err}");
    }
}
