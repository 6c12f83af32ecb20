//! DSPy's `LabeledFewShot`.

use super::super::example::Example;
use super::super::predict::Module;
use super::super::py::PyRandom;
use super::{Compiled, OptimizerReport, ReportRow};

/// Gives every predictor `k` demos drawn from the trainset with `random.Random(0).sample`
/// (one generator across predictors, as DSPy) — DSPy's `LabeledFewShot(k=16)`.
///
/// ```
/// use qlora::prompt::{Example, LabeledFewShot, Module, Predict};
/// let trainset: Vec<Example> = (0..10)
///     .map(|i| Example::new().with("question", format!("q{i}")).with("answer", format!("a{i}")).with_inputs(&["question"]))
///     .collect();
/// let compiled = LabeledFewShot::new(3).compile(&Predict::new("question -> answer")?, &trainset);
/// assert_eq!(compiled.program.demos.len(), 3);
/// # Ok::<(), qlora::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct LabeledFewShot {
    /// Demos per predictor (DSPy's default: 16).
    pub k: usize,
    /// Sample (true, DSPy's default) or take the first `k`.
    pub sample: bool,
}

impl Default for LabeledFewShot {
    fn default() -> Self {
        Self {
            k: 16,
            sample: true,
        }
    }
}

impl LabeledFewShot {
    /// `k` demos per predictor, sampled.
    pub fn new(k: usize) -> Self {
        Self { k, sample: true }
    }

    /// A copy of `student` (demos reset) with labeled demos.
    pub fn compile<P: Module + Clone>(&self, student: &P, trainset: &[Example]) -> Compiled<P> {
        let mut program = student.clone();
        program.reset();
        let mut rows = vec![];
        if !trainset.is_empty() {
            let mut rng = PyRandom::new(0);
            let k = self.k.min(trainset.len());
            for (name, p) in program.named_predictors_mut() {
                p.demos = if self.sample {
                    rng.sample(trainset, k)
                } else {
                    trainset[..k].to_vec()
                };
                rows.push(ReportRow {
                    example: None,
                    round: 0,
                    predictor: name,
                    outcome: "labeled demos".into(),
                    score: None,
                    kept: p.demos.len(),
                });
            }
        }
        Compiled {
            program,
            report: OptimizerReport {
                optimizer: "LabeledFewShot".into(),
                summary: format!(
                    "k={} from {} training examples{}",
                    self.k,
                    trainset.len(),
                    if self.sample {
                        " (sampled with random.Random(0))"
                    } else {
                        " (first k)"
                    }
                ),
                rows,
            },
            candidates: vec![],
        }
    }
}
