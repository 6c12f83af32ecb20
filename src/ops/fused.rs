//! Fused CPU kernels, each with a hand-written backward, for the decoder's element-wise ops:
//! RMSNorm, rotary embedding, the attention softmax (scale, mask and softmax in one pass) and
//! SwiGLU's gate.
//!
//! The composed versions in [`super`] are correct but build 5–8 graph nodes per op. candle's
//! backward allocates a zeroed gradient for every node and adds into it, so each node costs
//! several full passes over its tensor; at SmolLM2's size those passes, not the matrix products,
//! were a third of a training step. Here every op is one node whose backward is one pass.
//!
//! The kernels take contiguous f32 CPU tensors; [`super`] routes anything else (bf16/f16
//! compute, CUDA) to the composed ops. Under [`super::no_grad`], or when no input is tracked,
//! the ops record no graph at all.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Below this many elements a kernel runs on the calling thread (decoding one token).
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Whether the fused kernels can take this tensor.
pub(crate) fn supports(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 data, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// Runs `f` over a tensor held by an op (mask, rotary tables) as an f32 slice.
pub(crate) fn with_slice<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(slice(cpu, layout, op)?),
        _ => candle_core::bail!("{op}: expected a CPU tensor"),
    }
}

/// Applies `f(row_index, out_row)` to every `width`-long row of `out`, in parallel when large.
fn for_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if out.len() < PARALLEL_MIN_ELEMS {
        out.chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        let min_rows = (PARALLEL_MIN_ELEMS / 4 / width.max(1)).max(1);
        out.par_chunks_mut(width)
            .with_min_len(min_rows)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    }
}

fn tracked(ts: &[&Tensor]) -> bool {
    super::grad_enabled() && ts.iter().any(|t| t.track_op())
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `weight * x / sqrt(mean(x²) + eps)` over the last dimension, differentiable in `x` and
/// `weight`.
pub(crate) fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    let weight = weight.contiguous()?;
    let op = RmsNorm { eps: eps as f32 };
    if tracked(&[&xs, &weight]) {
        xs.apply_op2(&weight, op)
    } else {
        xs.apply_op2_no_bwd(&weight, &op)
    }
}

struct RmsNorm {
    eps: f32,
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let sum_sq: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (sum_sq / x.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let d = w.len();
        if l1.dims().last() != Some(&d) {
            candle_core::bail!(
                "rms_norm: weight has {d} entries, input rows {:?}",
                l1.dims()
            );
        }
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, d, |i, y| {
            let x = &x[i * d..(i + 1) * d];
            let r = inv_rms(x, self.eps);
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = w * (x * r);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let rows = x.elem_count() / weight.elem_count().max(1);
        // A frozen norm weight (the usual case) needs no column sum.
        let with_weight_grad = weight.track_op();
        // One op writes dx for every row and, when asked, dweight as an extra last row.
        let packed = x.detach().apply_op3_no_bwd(
            &weight.detach(),
            &grad.contiguous()?,
            &RmsNormBackward {
                eps: self.eps,
                with_weight_grad,
            },
        )?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = if with_weight_grad {
            Some(packed.narrow(0, rows, 1)?.reshape(weight.shape())?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// Input: `x`, the weight and the output gradient `g`. Output `[rows, d]` of `dx`, plus a last
/// row `dweight = Σ_rows g ⊙ x̂` when `with_weight_grad`.
struct RmsNormBackward {
    eps: f32,
    with_weight_grad: bool,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let g = slice(s3, l3, self.name())?;
        let d = w.len();
        if d == 0 || x.len() % d != 0 || g.len() != x.len() {
            candle_core::bail!(
                "rms_norm backward: {} inputs and {} gradients for rows of {d}",
                x.len(),
                g.len()
            );
        }
        let rows = x.len() / d;
        let inv: Vec<f32> = x.chunks(d).map(|x| inv_rms(x, self.eps)).collect();
        let extra = if self.with_weight_grad { d } else { 0 };
        let mut out = vec![0f32; x.len() + extra];
        let (dx, dw) = out.split_at_mut(x.len());
        // dx: per row. With x̂ = x·r and h = g ⊙ w:  dx = r · (h − x̂ · mean(h ⊙ x̂)).
        for_rows(dx, d, |i, dx| {
            let x = &x[i * d..(i + 1) * d];
            let g = &g[i * d..(i + 1) * d];
            let r = inv[i];
            let dot: f32 = x
                .iter()
                .zip(g)
                .zip(w)
                .map(|((x, g), w)| g * w * x * r)
                .sum();
            let mean = dot / d as f32;
            for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                *dx = r * (g * w - x * r * mean);
            }
        });
        if self.with_weight_grad {
            // dweight: a column sum, accumulated in per-thread partial rows.
            let partial = |range: std::ops::Range<usize>| {
                let mut acc = vec![0f32; d];
                for i in range {
                    let x = &x[i * d..(i + 1) * d];
                    let g = &g[i * d..(i + 1) * d];
                    for ((a, &x), &g) in acc.iter_mut().zip(x).zip(g) {
                        *a += g * x * inv[i];
                    }
                }
                acc
            };
            let per = rows.div_ceil(rayon::current_num_threads().max(1)).max(1);
            let sums: Vec<Vec<f32>> = (0..rows.div_ceil(per))
                .into_par_iter()
                .map(|c| partial(c * per..((c + 1) * per).min(rows)))
                .collect();
            for s in sums {
                for (a, v) in dw.iter_mut().zip(s) {
                    *a += v;
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + extra / d, d))))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

/// Rotary position embedding in the "rotate half" layout: `x·cos + rotate_half(x)·sin`, with `x`
/// `[batch, heads, seq, dim]` and `cos`, `sin` `[batch or 1, 1, seq, dim]`. Differentiable in
/// `x` (the tables are constants).
pub(crate) fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    let op = Rope {
        cos: cos.contiguous()?.detach(),
        sin: sin.contiguous()?.detach(),
        transpose: false,
    };
    op.check(&xs)?;
    if tracked(&[&xs]) {
        xs.apply_op1(op)
    } else {
        xs.apply_op1_no_bwd(&op)
    }
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// Apply the transposed rotation (the backward pass): `g·cos + rotate_halfᵀ(g·sin)`.
    transpose: bool,
}

impl Rope {
    fn check(&self, xs: &Tensor) -> Result<()> {
        let (b, _, t, d) = xs.dims4()?;
        let (cb, one, ct, cd) = self.cos.dims4()?;
        if one != 1
            || ct != t
            || cd != d
            || (cb != b && cb != 1)
            || self.sin.dims() != self.cos.dims()
        {
            candle_core::bail!(
                "rope: tables {:?} / {:?} do not fit an input {:?}",
                self.cos.dims(),
                self.sin.dims(),
                xs.dims()
            );
        }
        if d % 2 != 0 {
            candle_core::bail!("rope: head dimension {d} is odd");
        }
        Ok(())
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let (_, h, t, d) = layout.shape().dims4()?;
        let table_batch = self.cos.dim(0)?;
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        with_slice(&self.cos, self.name(), |cos| {
            with_slice(&self.sin, self.name(), |sin| {
                for_rows(&mut out, d, |row, y| {
                    let ti = row % t;
                    let bi = row / (t * h);
                    let at = ((if table_batch == 1 { 0 } else { bi }) * t + ti) * d;
                    let (c, s) = (&cos[at..at + d], &sin[at..at + d]);
                    let x = &x[row * d..(row + 1) * d];
                    for i in 0..half {
                        let j = i + half;
                        if self.transpose {
                            y[i] = x[i] * c[i] + x[j] * s[j];
                            y[j] = x[j] * c[j] - x[i] * s[i];
                        } else {
                            y[i] = x[i] * c[i] + -x[j] * s[i];
                            y[j] = x[j] * c[j] + x[i] * s[j];
                        }
                    }
                });
                Ok(())
            })
        })?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            transpose: !self.transpose,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention softmax

/// `softmax(scores · scale + mask)` over the last dimension, with `scores` `[batch, heads, q, k]`
/// and `mask` (additive, 0 or a large negative) `[batch or 1, 1, q, k]`. Differentiable in
/// `scores`.
pub(crate) fn attention_softmax(
    scores: &Tensor,
    scale: f32,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let scores = scores.contiguous()?;
    let (b, _, q, k) = scores.dims4()?;
    let mask = match mask {
        Some(m) => {
            let (mb, one, mq, mk) = m.dims4()?;
            if one != 1 || mq != q || mk != k || (mb != b && mb != 1) {
                candle_core::bail!(
                    "attention mask {:?} does not fit scores {:?}",
                    m.dims(),
                    scores.dims()
                );
            }
            Some(m.contiguous()?.detach())
        }
        None => None,
    };
    let op = AttentionSoftmax { scale, mask };
    if tracked(&[&scores]) {
        scores.apply_op1(op)
    } else {
        scores.apply_op1_no_bwd(&op)
    }
}

struct AttentionSoftmax {
    scale: f32,
    mask: Option<Tensor>,
}

impl AttentionSoftmax {
    fn run(&self, x: &[f32], dims: (usize, usize, usize, usize), mask: Option<&[f32]>) -> Vec<f32> {
        let (_, h, q, k) = dims;
        let mask_batch = self.mask.as_ref().map_or(1, |m| m.dim(0).unwrap_or(1));
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, k, |row, y| {
            let x = &x[row * k..(row + 1) * k];
            match mask {
                Some(m) => {
                    let qi = row % q;
                    let bi = row / (q * h);
                    let at = ((if mask_batch == 1 { 0 } else { bi }) * q + qi) * k;
                    for ((y, &x), &m) in y.iter_mut().zip(x).zip(&m[at..at + k]) {
                        *y = x * self.scale + m;
                    }
                }
                None => {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = x * self.scale;
                    }
                }
            }
            let max = y.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in y.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in y.iter_mut() {
                *v /= sum;
            }
        });
        out
    }
}

impl CustomOp1 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "fused-attention-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let dims = layout.shape().dims4()?;
        let out = match &self.mask {
            Some(m) => with_slice(m, self.name(), |m| Ok(self.run(x, dims, Some(m))))?,
            None => self.run(x, dims, None),
        };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = SoftmaxBackward { scale: self.scale };
        Ok(Some(
            res.detach().apply_op2_no_bwd(&grad.contiguous()?, &op)?,
        ))
    }
}

/// `scale · p ⊙ (g − Σ g⊙p)` per row, from the probabilities `p` and their gradient `g`.
struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = slice(s1, l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        let k = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; p.len()];
        for_rows(&mut out, k, |row, dx| {
            let p = &p[row * k..(row + 1) * k];
            let g = &g[row * k..(row + 1) * k];
            let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
            for ((dx, &p), &g) in dx.iter_mut().zip(p).zip(g) {
                *dx = self.scale * p * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) ⊙ up`, differentiable in both.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        );
    }
    let gate = gate.contiguous()?;
    let up = up.contiguous()?;
    if tracked(&[&gate, &up]) {
        gate.apply_op2(&up, SwiGlu)
    } else {
        gate.apply_op2_no_bwd(&up, &SwiGlu)
    }
}

struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = slice(s1, l1, self.name())?;
        let u = slice(s2, l2, self.name())?;
        let width = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; g.len()];
        for_rows(&mut out, width, |row, y| {
            let at = row * width;
            for ((y, &g), &u) in y.iter_mut().zip(&g[at..at + width]).zip(&u[at..at + width]) {
                // candle's silu: x / (1 + exp(-x)).
                *y = g / (1.0 + (-g).exp()) * u;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let packed =
            gate.detach()
                .apply_op3_no_bwd(&up.detach(), &grad.contiguous()?, &SwiGluBackward)?;
        let dgate = packed.narrow(0, 0, n)?.reshape(gate.shape())?;
        let dup = packed.narrow(0, n, n)?.reshape(up.shape())?;
        Ok((
            gate.track_op().then_some(dgate),
            up.track_op().then_some(dup),
        ))
    }
}

/// Input: gate, up and the output gradient. Output (flat): `dgate` then `dup`.
struct SwiGluBackward;

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "fused-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = slice(s1, l1, self.name())?;
        let u = slice(s2, l2, self.name())?;
        let dy = slice(s3, l3, self.name())?;
        let n = dy.len();
        if g.len() != n || u.len() != n {
            candle_core::bail!(
                "swiglu backward: {} gates, {} ups, {n} gradients",
                g.len(),
                u.len()
            );
        }
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        const BLOCK: usize = 4096;
        let work = |(bi, (dg, du)): (usize, (&mut [f32], &mut [f32]))| {
            let at = bi * BLOCK;
            for i in 0..dg.len() {
                let (x, up, d) = (g[at + i], u[at + i], dy[at + i]);
                let s = sigmoid(x);
                dg[i] = d * up * s * (1.0 + x * (1.0 - s));
                du[i] = d * x * s;
            }
        };
        if n < PARALLEL_MIN_ELEMS {
            dg.chunks_mut(BLOCK)
                .zip(du.chunks_mut(BLOCK))
                .enumerate()
                .for_each(work);
        } else {
            dg.par_chunks_mut(BLOCK)
                .zip(du.par_chunks_mut(BLOCK))
                .enumerate()
                .for_each(work);
        }
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{composed, max_abs_diff, no_grad};
    use super::*;
    use candle_core::{DType, Device, Var};

    fn randn(shape: &[usize], std: f32) -> Tensor {
        Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
    }

    /// Gradients of `Σ out ⊙ probe` with respect to `inputs`, for a fixed random `probe`.
    fn grads_of(out: &Tensor, probe: &Tensor, inputs: &[&Var]) -> Vec<Tensor> {
        let grads = (out * probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        inputs
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .expect("input gets a gradient")
                    .clone()
            })
            .collect()
    }

    /// Forward values and gradients of the fused op equal the composed op's, on shapes large
    /// enough to take the parallel path and small enough for the serial one.
    fn assert_same(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&ts), composed(&ts));
        assert_eq!(a.dims(), b.dims());
        let forward = max_abs_diff(&a, &b);
        assert!(forward <= tol, "forward differs by {forward}");
        assert!(
            a.track_op(),
            "the fused op records a graph for tracked inputs"
        );
        let probe = randn(a.dims(), 1.0);
        let refs: Vec<&Var> = vars.iter().collect();
        for (i, (ga, gb)) in grads_of(&a, &probe, &refs)
            .iter()
            .zip(grads_of(&b, &probe, &refs))
            .enumerate()
        {
            let scale = gb
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_abs_diff(ga, &gb);
            assert!(scale > 0.0, "input {i} gets a zero gradient");
            assert!(
                diff <= tol * scale.max(1.0),
                "gradient of input {i} differs by {diff} (scale {scale})"
            );
        }
    }

    #[test]
    fn rms_norm_equals_composed_in_value_and_both_gradients() {
        for shape in [[2usize, 3, 8], [4, 128, 576]] {
            let w = (randn(&[shape[2]], 0.1) + 1.0).unwrap();
            assert_same(
                &[randn(&shape, 1.0), w],
                |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
                |t| composed::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
                2e-5,
            );
        }
    }

    #[test]
    fn rope_equals_composed_in_value_and_gradient() {
        for (b, h, t, d, table_batch) in [(1, 2, 5, 8, 1), (4, 9, 128, 64, 4), (2, 3, 7, 16, 2)] {
            let cos = randn(&[table_batch, 1, t, d], 1.0);
            let sin = randn(&[table_batch, 1, t, d], 1.0);
            assert_same(
                &[randn(&[b, h, t, d], 1.0)],
                |x| rope(&x[0], &cos, &sin).unwrap(),
                |x| composed::apply_rope(&x[0], &cos, &sin).unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn attention_softmax_equals_composed_with_and_without_mask() {
        let scale = 0.125f32;
        for (b, h, q, k) in [(1, 2, 3, 5), (4, 9, 128, 128), (2, 3, 1, 9)] {
            // Causal plus a padded first key in batch row 0 (the rows that see only padding
            // stay finite, as in transformers).
            let mut m = vec![0f32; b * q * k];
            for bi in 0..b {
                for qi in 0..q {
                    for ki in 0..k {
                        if ki > qi + (k - q) || (bi == 0 && ki == 0) {
                            m[(bi * q + qi) * k + ki] = f32::MIN;
                        }
                    }
                }
            }
            let mask = Tensor::from_vec(m, (b, 1, q, k), &Device::Cpu).unwrap();
            for mask in [Some(&mask), None] {
                assert_same(
                    &[randn(&[b, h, q, k], 3.0)],
                    |s| attention_softmax(&s[0], scale, mask).unwrap(),
                    |s| {
                        let z = (&s[0] * scale as f64).unwrap();
                        let z = match mask {
                            Some(m) => z.broadcast_add(m).unwrap(),
                            None => z,
                        };
                        composed::softmax_last_dim(&z).unwrap()
                    },
                    1e-6,
                );
            }
        }
    }

    #[test]
    fn swiglu_equals_composed_in_value_and_both_gradients() {
        for shape in [&[3usize, 10][..], &[4, 128, 1536]] {
            assert_same(
                &[randn(shape, 3.0), randn(shape, 1.0)],
                |t| swiglu(&t[0], &t[1]).unwrap(),
                |t| composed::swiglu(&t[0], &t[1]).unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn frozen_inputs_and_no_grad_record_nothing() {
        let x = Var::from_tensor(&randn(&[2, 4, 8], 1.0)).unwrap();
        let w = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
        assert!(rms_norm(x.as_tensor(), &w, 1e-6).unwrap().track_op());
        assert!(!rms_norm(&x.as_tensor().detach(), &w, 1e-6)
            .unwrap()
            .track_op());
        let inside = no_grad(|| swiglu(x.as_tensor(), x.as_tensor()).unwrap());
        assert!(!inside.track_op());
        // A frozen weight gets no gradient entry; the input still does.
        let grads = rms_norm(x.as_tensor(), &w, 1e-6)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&w).is_none());
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let x = randn(&[1, 2, 3, 8], 1.0);
        let cos = randn(&[1, 1, 4, 8], 1.0);
        let err = rope(&x, &cos, &cos).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        let mask = randn(&[1, 1, 3, 5], 1.0);
        let err = attention_softmax(&randn(&[1, 2, 3, 4], 1.0), 1.0, Some(&mask))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not fit"), "{err}");
        let err = swiglu(&randn(&[2, 3], 1.0), &randn(&[3, 2], 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("differ in shape"), "{err}");
    }
}
