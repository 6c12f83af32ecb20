//! Rich notebook output through evcxr's protocol: a type shows itself as HTML when it has an
//! `evcxr_display` method printing `EVCXR_BEGIN_CONTENT text/html ... EVCXR_END_CONTENT`.

use std::collections::BTreeMap;
use std::fmt;

use crate::model::{Model, ModelSource};

pub mod plot;

/// Escapes text for HTML.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Prints `html` so that evcxr renders it in the notebook.
pub fn emit_html(html: &str) {
    println!("EVCXR_BEGIN_CONTENT text/html\n{html}\nEVCXR_END_CONTENT");
}

/// A two-column HTML table with a caption.
pub fn key_value_table(caption: &str, rows: &[(String, String)]) -> String {
    let mut html = format!(
        "<table style=\"border-collapse:collapse\"><caption style=\"text-align:left;\
         font-weight:bold\">{}</caption>",
        escape_html(caption)
    );
    for (k, v) in rows {
        html.push_str(&format!(
            "<tr><th style=\"text-align:left;padding:2px 12px 2px 0\">{}</th>\
             <td style=\"text-align:left\">{}</td></tr>",
            escape_html(k),
            escape_html(v)
        ));
    }
    html.push_str("</table>");
    html
}

/// Groups digits in threes: `921600` → `921,600` (as PEFT prints counts).
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Human-readable byte count.
pub fn human_bytes(n: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// What a model is: architecture, shapes, parameters and how they are stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    pub name: String,
    pub source: String,
    pub architecture: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub attention_heads: usize,
    pub kv_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
    pub parameters: usize,
    /// Bytes the weights occupy in memory.
    pub weight_bytes: usize,
    /// Parameters of the linear layers by storage format (`Q4_1`, `f32`, ...).
    pub linear_formats: BTreeMap<String, usize>,
    pub compute_dtype: String,
    pub device: String,
    pub has_chat_template: bool,
}

impl ModelSummary {
    /// Average bits per parameter of the stored weights.
    pub fn bits_per_parameter(&self) -> f64 {
        8.0 * self.weight_bytes as f64 / self.parameters.max(1) as f64
    }

    fn rows(&self) -> Vec<(String, String)> {
        let formats = self
            .linear_formats
            .iter()
            .map(|(k, v)| format!("{k}: {}", thousands(*v)))
            .collect::<Vec<_>>()
            .join(", ");
        vec![
            ("source".into(), self.source.clone()),
            ("architecture".into(), self.architecture.clone()),
            (
                "layers × hidden".into(),
                format!("{} × {}", self.layers, self.hidden_size),
            ),
            (
                "attention heads (kv)".into(),
                format!("{} ({})", self.attention_heads, self.kv_heads),
            ),
            ("MLP size".into(), self.intermediate_size.to_string()),
            (
                "vocabulary".into(),
                format!(
                    "{}{}",
                    thousands(self.vocab_size),
                    if self.tied_embeddings {
                        " (tied head)"
                    } else {
                        ""
                    }
                ),
            ),
            ("parameters".into(), thousands(self.parameters)),
            (
                "weights in memory".into(),
                format!(
                    "{} ({:.2} bits/param)",
                    human_bytes(self.weight_bytes),
                    self.bits_per_parameter()
                ),
            ),
            ("linear layers by format".into(), formats),
            (
                "compute".into(),
                format!("{} on {}", self.compute_dtype, self.device),
            ),
            (
                "chat template".into(),
                if self.has_chat_template { "yes" } else { "no" }.into(),
            ),
        ]
    }

    /// Shows the summary as an HTML table in a notebook.
    pub fn evcxr_display(&self) {
        emit_html(&key_value_table(&self.name, &self.rows()));
    }
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.name)?;
        for (k, v) in self.rows() {
            writeln!(f, "  {k:<24} {v}")?;
        }
        Ok(())
    }
}

impl Model {
    /// Architecture, size and storage of the model.
    pub fn summary(&self) -> ModelSummary {
        let d = &self.decoder;
        let c = &d.config;
        let mut linear_formats = BTreeMap::new();
        let mut weight_bytes = d.embed_tokens.elem_count() * d.embed_tokens.dtype().size_in_bytes();
        for layer in &d.layers {
            for (_, lin) in layer.linears() {
                *linear_formats.entry(lin.format_name()).or_insert(0) += lin.num_parameters();
                weight_bytes += lin.storage_bytes();
            }
            for norm in [&layer.input_layernorm, &layer.post_attention_layernorm] {
                weight_bytes += norm.elem_count() * norm.dtype().size_in_bytes();
            }
        }
        weight_bytes += d.norm.elem_count() * d.norm.dtype().size_in_bytes();
        if !c.tie_word_embeddings || matches!(self.source, ModelSource::Gguf(_)) {
            // A GGUF's tied head is held as its own quantised copy.
            weight_bytes += d.lm_head.storage_bytes();
        }
        ModelSummary {
            name: self.name.clone(),
            source: self.source.path().display().to_string(),
            architecture: c.architecture.hf_class().to_string(),
            layers: c.num_hidden_layers,
            hidden_size: c.hidden_size,
            attention_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            tied_embeddings: c.tie_word_embeddings,
            parameters: d.num_parameters(),
            weight_bytes,
            linear_formats,
            compute_dtype: d.dtype().as_str().to_string(),
            device: format!("{:?}", d.device()),
            has_chat_template: self.tokenizer.chat_template().is_some(),
        }
    }

    /// Shows the model summary as an HTML table in a notebook.
    pub fn evcxr_display(&self) {
        self.summary().evcxr_display();
    }
}

/// Rows describing a LoRA configuration.
fn lora_config_rows(c: &crate::lora::LoraConfig) -> Vec<(String, String)> {
    let targets = match &c.target_modules {
        None => "q_proj, v_proj (default)".to_string(),
        Some(crate::lora::TargetModules::List(v)) => v.join(", "),
        Some(crate::lora::TargetModules::Pattern(p)) => p.clone(),
    };
    let mut rows = vec![
        ("r".to_string(), c.r.to_string()),
        ("lora_alpha".to_string(), c.lora_alpha.to_string()),
        (
            "scaling".to_string(),
            format!(
                "{}{}",
                c.scaling(),
                if c.use_rslora { " (rslora)" } else { "" }
            ),
        ),
        ("lora_dropout".to_string(), c.lora_dropout.to_string()),
        ("target_modules".to_string(), targets),
        ("bias".to_string(), c.bias.clone()),
        (
            "init_lora_weights".to_string(),
            serde_json::to_string(&c.init_lora_weights).unwrap_or_default(),
        ),
    ];
    if let Some(layers) = &c.layers_to_transform {
        rows.push((
            "layers_to_transform".to_string(),
            serde_json::to_string(layers).unwrap_or_default(),
        ));
    }
    if let Some(t) = &c.task_type {
        rows.push(("task_type".to_string(), t.clone()));
    }
    rows
}

impl crate::lora::LoraConfig {
    /// Shows the configuration as an HTML table in a notebook.
    pub fn evcxr_display(&self) {
        emit_html(&key_value_table("LoraConfig", &lora_config_rows(self)));
    }
}

impl crate::lora::PeftModel {
    /// Shows which modules carry which adapters and the trainable share, in a notebook.
    pub fn evcxr_display(&self) {
        let (trainable, all) = self.parameter_counts();
        let mut rows = vec![
            ("base model".to_string(), self.model().name.clone()),
            (
                "active adapter".to_string(),
                self.active_adapter().to_string(),
            ),
            ("trainable params".to_string(), thousands(trainable)),
            ("all params".to_string(), thousands(all)),
            (
                "trainable %".to_string(),
                format!("{:.4}", 100.0 * trainable as f64 / all.max(1) as f64),
            ),
        ];
        // Group adapted modules by their short name: "q_proj × 30 layers".
        let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
        for path in self.adapted_modules() {
            let kind = path.rsplit('.').next().unwrap_or(path).to_string();
            *by_kind.entry(kind).or_insert(0) += 1;
        }
        rows.push((
            "adapted modules".to_string(),
            by_kind
                .iter()
                .map(|(k, n)| format!("{k} × {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        ));
        let saved: Vec<&str> = self.saved_modules().map(|(p, _)| p).collect();
        if !saved.is_empty() {
            rows.push(("trained in full".to_string(), saved.join(", ")));
        }
        let mut html = key_value_table("PeftModel", &rows);
        for name in self.adapter_names() {
            if let Some(cfg) = self.config(&name) {
                html.push_str(&key_value_table(
                    &format!("adapter `{name}`"),
                    &lora_config_rows(cfg),
                ));
            }
        }
        emit_html(&html);
    }
}

impl crate::train::TrainRun {
    /// Summary rows: steps, losses, speed, outcome.
    fn summary_rows(&self) -> Vec<(String, String)> {
        let mut rows = vec![
            (
                "steps".to_string(),
                format!(
                    "{} of {}",
                    self.history.last().map_or(0, |r| r.step),
                    self.total_steps
                ),
            ),
            (
                "first → last loss".to_string(),
                match (self.history.first(), self.history.last()) {
                    (Some(a), Some(b)) => format!("{:.4} → {:.4}", a.loss, b.loss),
                    _ => "—".to_string(),
                },
            ),
        ];
        if let Some((loss, step)) = self.best_eval {
            rows.push((
                "best eval loss".to_string(),
                format!("{loss:.4} (step {step})"),
            ));
        }
        rows.push((
            "time".to_string(),
            format!(
                "{:.1} s, {:.0} tokens/s",
                self.train_seconds,
                self.tokens_per_sec()
            ),
        ));
        let outcome = match &self.stop_reason {
            crate::train::StopReason::Completed => "completed".to_string(),
            crate::train::StopReason::EarlyStopped { step, best_step } => {
                format!("early stopped at step {step}, adapter of step {best_step} restored")
            }
        };
        rows.push(("outcome".to_string(), outcome));
        if let Some(step) = self.resumed_from_step {
            rows.push(("resumed after step".to_string(), step.to_string()));
        }
        if let Some(dir) = &self.output_dir {
            rows.push(("saved to".to_string(), dir.display().to_string()));
        }
        rows
    }

    /// Shows the outcome and the loss plot in a notebook.
    pub fn evcxr_display(&self) {
        emit_html(&format!(
            "<div>{}{}</div>",
            key_value_table("training run", &self.summary_rows()),
            self.loss_plot_svg()
        ));
    }
}

impl fmt::Display for crate::train::TrainRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "training run")?;
        for (k, v) in self.summary_rows() {
            writeln!(f, "  {k:<20} {v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_helpers() {
        assert_eq!(thousands(921600), "921,600");
        assert_eq!(thousands(12), "12");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(escape_html("<a&b>"), "&lt;a&amp;b&gt;");
    }
}
