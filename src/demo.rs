//! The main job, end to end on the default model: turn customer-support tickets into a strict JSON
//! record. A small instruct model doesn't know our label set or our format zero-shot; a few
//! minutes of QLoRA on CPU teach it both. The data is generated here (no downloads), from
//! templates with random order numbers, products, wording and urgency cues.
//!
//! [`run_demo`] evaluates the base model, fine-tunes it, evaluates again on the same held-out
//! tickets and writes the adapter, the training history, the loss plot and an HTML report.

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::data::{DataConfig, Record, SftDataset};
use crate::display::{emit_html, escape_html, key_value_table};
use crate::generate::GenerationConfig;
use crate::lora::{setup_qlora, LoraConfig, PeftModel};
use crate::model::{Message, Model};
use crate::rng::SplitMix64;
use crate::train::{train, TrainConfig, TrainRun};
use crate::{Error, Result};

/// The intents a ticket can have.
pub const INTENTS: [&str; 6] = [
    "refund",
    "cancel_order",
    "track_order",
    "change_address",
    "damaged_item",
    "billing_question",
];

/// The system message of every demo conversation (SmolLM2's template would otherwise insert its
/// own, longer default).
pub const SYSTEM_PROMPT: &str = "You turn customer support tickets into JSON records.";

/// Urgency levels.
pub const URGENCIES: [&str; 3] = ["low", "normal", "high"];

/// One generated ticket and the record it should become.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    /// What the customer wrote.
    pub text: String,
    /// One of [`INTENTS`].
    pub intent: String,
    /// `ORD-` and five digits, as written in the ticket.
    pub order_id: String,
    /// One of [`URGENCIES`].
    pub urgency: String,
}

impl Ticket {
    /// The exact completion the model should produce.
    pub fn target_json(&self) -> String {
        format!(
            "{{\"intent\": \"{}\", \"order_id\": \"{}\", \"urgency\": \"{}\"}}",
            self.intent, self.order_id, self.urgency
        )
    }

    /// The user message asking for the extraction.
    pub fn prompt(&self) -> String {
        format!(
            "Extract this support ticket as JSON with keys \"intent\" (one of: {}), \"order_id\" and \"urgency\" (low, normal or high).\nTicket: {}",
            INTENTS.join(", "),
            self.text
        )
    }

    /// The conversation up to the answer: a short system message, then the ticket.
    pub fn messages(&self) -> Vec<Message> {
        vec![Message::system(SYSTEM_PROMPT), Message::user(self.prompt())]
    }

    /// Prompt and answer as a chat example.
    pub fn to_record(&self) -> Record {
        Record::Chat(vec![
            Message::system(SYSTEM_PROMPT),
            Message::user(self.prompt()),
            Message::assistant(self.target_json()),
        ])
    }
}

const PRODUCTS: [&str; 12] = [
    "wireless headphones",
    "coffee grinder",
    "yoga mat",
    "phone case",
    "desk lamp",
    "running shoes",
    "backpack",
    "blender",
    "smart watch",
    "winter jacket",
    "water bottle",
    "keyboard",
];

const TEMPLATES: [(&str, &[&str]); 6] = [
    (
        "refund",
        &[
            "I returned the {p} from order {id} two weeks ago and still have not got my money back.",
            "Please refund order {id}, the {p} was not what I expected.",
            "Can I get my money back for the {p}? Order number {id}.",
            "I want a refund for {id}. The {p} doesn't fit my needs.",
            "Order {id}: I sent the {p} back, where is my refund?",
        ],
    ),
    (
        "cancel_order",
        &[
            "Please cancel order {id}, I ordered the {p} by mistake.",
            "I changed my mind about the {p}. Cancel {id} before it ships.",
            "Cancel my order {id} please, I found the {p} cheaper elsewhere.",
            "Stop order {id} - I no longer need the {p}.",
            "How do I cancel {id}? I don't want the {p} anymore.",
        ],
    ),
    (
        "track_order",
        &[
            "Where is my {p}? Order {id} was supposed to arrive already.",
            "Can you tell me the delivery status of order {id}?",
            "My order {id} ({p}) hasn't shown up yet. Where is it?",
            "Any tracking info for {id}? Waiting on a {p}.",
            "When will order {id} arrive? It's the {p}.",
        ],
    ),
    (
        "change_address",
        &[
            "I moved last week. Please ship order {id} to my new address instead.",
            "Can you change the delivery address for {id}? The {p} should go to my office.",
            "Wrong address on order {id}, please update it before the {p} ships.",
            "Please send the {p} from order {id} to a different address.",
            "I need to update the shipping address on {id}.",
        ],
    ),
    (
        "damaged_item",
        &[
            "The {p} from order {id} arrived broken.",
            "My {p} came damaged, the box was crushed. Order {id}.",
            "Order {id}: the {p} is cracked and doesn't work.",
            "The {p} I received in {id} has a big scratch and a dent.",
            "Received order {id} today but the {p} is smashed.",
        ],
    ),
    (
        "billing_question",
        &[
            "I was charged twice for order {id}. Why?",
            "The amount on my card for {id} is higher than the price of the {p}.",
            "Can you explain the extra fee on order {id}?",
            "Why did my bank show two payments for the {p}? Order {id}.",
            "I need an invoice for order {id}, the charge looks wrong.",
        ],
    ),
];

const HIGH: [&str; 5] = [
    " This is urgent!",
    " Please fix this ASAP.",
    " I need this sorted today, it's urgent.",
    " URGENT - please respond immediately.",
    " I need an answer right away.",
];
const LOW: [&str; 4] = [
    " No rush.",
    " Whenever you have time, thanks.",
    " Not urgent, just let me know.",
    " No hurry at all.",
];
const OPENERS: [&str; 5] = ["", "Hi, ", "Hello, ", "Hey there. ", "Good morning, "];

fn pick<'a>(rng: &mut SplitMix64, items: &[&'a str]) -> &'a str {
    items[(rng.next_u64() % items.len() as u64) as usize]
}

/// `n` tickets from `seed`, intents and urgencies balanced by chance.
///
/// ```
/// let tickets = qlora::demo::generate_tickets(3, 7);
/// assert_eq!(tickets.len(), 3);
/// assert!(tickets[0].text.contains(&tickets[0].order_id));
/// ```
pub fn generate_tickets(n: usize, seed: u64) -> Vec<Ticket> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let (intent, templates) = TEMPLATES[(rng.next_u64() % TEMPLATES.len() as u64) as usize];
            let order_id = format!("ORD-{:05}", rng.next_u64() % 100_000);
            let body = pick(&mut rng, templates)
                .replace("{p}", pick(&mut rng, &PRODUCTS))
                .replace("{id}", &order_id);
            let urgency = URGENCIES[(rng.next_u64() % 3) as usize];
            let cue = match urgency {
                "high" => pick(&mut rng, &HIGH),
                "low" => pick(&mut rng, &LOW),
                _ => "",
            };
            let opener = pick(&mut rng, &OPENERS);
            let mut text = format!("{opener}{body}{cue}");
            if !opener.is_empty() {
                // "Hi, I returned…": keep the sentence's first letter lower-case after a comma.
                if opener.ends_with(", ") {
                    let (head, tail) = text.split_at(opener.len());
                    let mut chars = tail.chars();
                    let first = chars.next().map(|c| {
                        if tail.starts_with("I ") || tail.starts_with("I'") {
                            c
                        } else {
                            c.to_ascii_lowercase()
                        }
                    });
                    text = format!(
                        "{head}{}{}",
                        first.map(String::from).unwrap_or_default(),
                        chars.as_str()
                    );
                }
            }
            Ticket {
                text,
                intent: intent.to_string(),
                order_id,
                urgency: urgency.to_string(),
            }
        })
        .collect()
}

/// How one prediction compares with its ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The ticket text.
    pub ticket: String,
    /// The expected JSON.
    pub expected: String,
    /// What the model wrote.
    pub output: String,
    /// Output parses as a JSON object.
    pub valid_json: bool,
    /// All three fields equal.
    pub exact: bool,
    /// Fields that match: intent, order_id, urgency.
    pub fields: [bool; 3],
}

/// Scores over a test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtractionScores {
    /// Tickets evaluated.
    pub n: usize,
    /// Share whose output parses as a JSON object.
    pub valid_json: f64,
    /// Share with every field right.
    pub exact_match: f64,
    /// Per-field accuracy: intent, order_id, urgency.
    pub field_accuracy: [f64; 3],
    /// Every prediction.
    pub predictions: Vec<Prediction>,
    /// Seconds spent generating.
    pub seconds: f64,
}

/// Compares a model output with the ticket's record.
pub fn score_output(ticket: &Ticket, output: &str) -> Prediction {
    let trimmed = output.trim();
    // Tolerate a Markdown fence around the object; nothing else.
    let body = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|s| s.strip_suffix("```"))
        .unwrap_or(trimmed)
        .trim();
    let parsed: Option<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_str(body).ok();
    let field = |key: &str, want: &str| {
        parsed
            .as_ref()
            .and_then(|m| m.get(key))
            .and_then(|v| v.as_str())
            .is_some_and(|v| v == want)
    };
    let fields = [
        field("intent", &ticket.intent),
        field("order_id", &ticket.order_id),
        field("urgency", &ticket.urgency),
    ];
    let exact = fields.iter().all(|&f| f) && parsed.as_ref().is_some_and(|m| m.len() == 3);
    Prediction {
        ticket: ticket.text.clone(),
        expected: ticket.target_json(),
        output: output.to_string(),
        valid_json: parsed.is_some(),
        exact,
        fields,
    }
}

/// Generates greedily for every ticket (in batches) and scores the outputs.
pub fn evaluate_extraction(
    model: &Model,
    tickets: &[Ticket],
    batch_size: usize,
) -> Result<ExtractionScores> {
    let start = Instant::now();
    let config = GenerationConfig::greedy(40);
    let mut predictions = Vec::with_capacity(tickets.len());
    for chunk in tickets.chunks(batch_size.max(1)) {
        let conversations: Vec<Vec<Message>> = chunk.iter().map(Ticket::messages).collect();
        let outputs = model.generate_chat_batch(&conversations, &config)?;
        for (t, o) in chunk.iter().zip(outputs) {
            predictions.push(score_output(t, &o.text));
        }
    }
    let n = predictions.len().max(1) as f64;
    let share =
        |f: &dyn Fn(&Prediction) -> bool| predictions.iter().filter(|p| f(p)).count() as f64 / n;
    Ok(ExtractionScores {
        n: predictions.len(),
        valid_json: share(&|p| p.valid_json),
        exact_match: share(&|p| p.exact),
        field_accuracy: [
            share(&|p| p.fields[0]),
            share(&|p| p.fields[1]),
            share(&|p| p.fields[2]),
        ],
        predictions,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// What the demo does; `Default` is `make demo`'s configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DemoConfig {
    /// `default` or any model spec [`Model::load`] takes.
    pub model: String,
    /// Generated training tickets.
    pub train_examples: usize,
    /// Held-out tickets (a different seed).
    pub test_examples: usize,
    /// LoRA recipe.
    pub lora: LoraConfig,
    /// Trainer settings (its `output_dir` is set to `output_dir/adapter`).
    pub train: TrainConfig,
    /// Where the adapter, history, plot and report go.
    pub output_dir: PathBuf,
    /// Generation batch size for evaluation.
    pub eval_batch_size: usize,
    /// Recompute activations in the backward pass (less memory, about a third more compute; the
    /// default model at batch 4 fits comfortably without it).
    pub gradient_checkpointing: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            model: "default".into(),
            train_examples: 96,
            test_examples: 40,
            lora: LoraConfig::qlora(),
            train: TrainConfig::default()
                .epochs(1.0)
                .batch_size(4)
                .learning_rate(1e-3)
                .logging_steps(10),
            output_dir: PathBuf::from("runs/demo"),
            eval_batch_size: 8,
            gradient_checkpointing: false,
        }
    }
}

/// Before and after.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoReport {
    /// The base model's scores.
    pub before: ExtractionScores,
    /// The fine-tuned model's scores on the same tickets.
    pub after: ExtractionScores,
    /// The training run.
    pub run: TrainRun,
    /// The configuration used.
    pub config: DemoConfig,
    /// Total wall time, seconds.
    pub total_seconds: f64,
}

/// Runs the whole demo: generate data, evaluate the base model, fine-tune with QLoRA, evaluate
/// again, save adapter + history + plot + `report.html` into `config.output_dir`.
pub fn run_demo(config: &DemoConfig) -> Result<DemoReport> {
    let start = Instant::now();
    if config.train_examples == 0 || config.test_examples == 0 {
        return Err(Error::InvalidArgument(
            "DemoConfig: train_examples and test_examples must be at least 1".into(),
        ));
    }
    let model = Model::load(&config.model)?;
    let train_tickets = generate_tickets(config.train_examples, 1);
    let test_tickets = generate_tickets(config.test_examples, 2);
    let records: Vec<Record> = train_tickets.iter().map(Ticket::to_record).collect();
    let data = SftDataset::from_records(records, &model, &DataConfig::default())?;

    println!(
        "evaluating the base model on {} held-out tickets…",
        test_tickets.len()
    );
    let before = evaluate_extraction(&model, &test_tickets, config.eval_batch_size)?;
    println!(
        "base model: exact match {:.1}%, valid JSON {:.1}%",
        100.0 * before.exact_match,
        100.0 * before.valid_json
    );

    let mut peft: PeftModel = setup_qlora(model, &config.lora)?;
    peft.set_gradient_checkpointing(config.gradient_checkpointing);
    peft.print_trainable_parameters();
    let mut train_config = config.train.clone();
    train_config.output_dir = Some(config.output_dir.join("adapter"));
    let run = train(&mut peft, &data, &train_config)?;

    println!("evaluating the fine-tuned model…");
    let after = evaluate_extraction(peft.model(), &test_tickets, config.eval_batch_size)?;
    let report = DemoReport {
        before,
        after,
        run,
        config: config.clone(),
        total_seconds: start.elapsed().as_secs_f64(),
    };
    report.save()?;
    Ok(report)
}

impl DemoReport {
    fn rows(&self) -> Vec<[String; 3]> {
        let pct = |v: f64| format!("{:.1}%", 100.0 * v);
        let (b, a) = (&self.before, &self.after);
        vec![
            ["exact match".into(), pct(b.exact_match), pct(a.exact_match)],
            ["valid JSON".into(), pct(b.valid_json), pct(a.valid_json)],
            [
                "intent".into(),
                pct(b.field_accuracy[0]),
                pct(a.field_accuracy[0]),
            ],
            [
                "order_id".into(),
                pct(b.field_accuracy[1]),
                pct(a.field_accuracy[1]),
            ],
            [
                "urgency".into(),
                pct(b.field_accuracy[2]),
                pct(a.field_accuracy[2]),
            ],
        ]
    }

    /// The report as a standalone HTML page: before/after table, loss plot, sample outputs.
    pub fn to_html(&self) -> String {
        let mut html = String::from(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>qlora demo</title>\
             <style>body{font-family:sans-serif;max-width:900px;margin:2em auto}\
             td,th{padding:3px 10px;text-align:left}code{white-space:pre-wrap}</style></head><body>\
             <h1>Support tickets → JSON: before and after QLoRA</h1>",
        );
        html.push_str(&self.table_html());
        html.push_str(&self.run.loss_plot_svg());
        html.push_str(
            "<h2>Sample outputs</h2><table><tr><th>ticket</th><th>before</th><th>after</th></tr>",
        );
        for (b, a) in self
            .before
            .predictions
            .iter()
            .zip(&self.after.predictions)
            .take(8)
        {
            html.push_str(&format!(
                "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
                escape_html(&b.ticket),
                escape_html(&b.output),
                escape_html(&a.output)
            ));
        }
        html.push_str("</table></body></html>");
        html
    }

    fn table_html(&self) -> String {
        let mut html = String::from(
            "<table style=\"border-collapse:collapse\"><tr><th>metric</th><th>base model</th><th>after QLoRA</th></tr>",
        );
        for [m, b, a] in self.rows() {
            html.push_str(&format!("<tr><td>{m}</td><td>{b}</td><td>{a}</td></tr>"));
        }
        html.push_str("</table>");
        html.push_str(&key_value_table(
            "run",
            &[
                ("test tickets".into(), self.after.n.to_string()),
                ("training steps".into(), self.run.total_steps.to_string()),
                (
                    "training time".into(),
                    format!(
                        "{:.0} s ({:.0} tokens/s)",
                        self.run.train_seconds,
                        self.run.tokens_per_sec()
                    ),
                ),
                ("total time".into(), format!("{:.0} s", self.total_seconds)),
            ],
        ));
        html
    }

    /// Writes `report.html` and `report.json` into the output folder.
    pub fn save(&self) -> Result<()> {
        let dir = &self.config.output_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("serialising the report: {e}")))?;
        for (name, text) in [("report.html", self.to_html()), ("report.json", json)] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Shows the before/after table and the loss plot in a notebook.
    pub fn evcxr_display(&self) {
        emit_html(&format!(
            "<div>{}{}</div>",
            self.table_html(),
            self.run.loss_plot_svg()
        ));
    }
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<14} {:>12} {:>14}",
            "metric", "base model", "after QLoRA"
        )?;
        for [m, b, a] in self.rows() {
            writeln!(f, "{m:<14} {b:>12} {a:>14}")?;
        }
        writeln!(
            f,
            "{} test tickets; {} training steps in {:.0} s; total {:.0} s",
            self.after.n, self.run.total_steps, self.run.train_seconds, self.total_seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_deterministic_and_carry_their_fields() {
        let a = generate_tickets(50, 3);
        assert_eq!(a, generate_tickets(50, 3));
        assert_ne!(a, generate_tickets(50, 4));
        for t in &a {
            assert!(t.text.contains(&t.order_id), "{t:?}");
            assert!(INTENTS.contains(&t.intent.as_str()));
            assert!(URGENCIES.contains(&t.urgency.as_str()));
        }
        let intents: std::collections::BTreeSet<_> = a.iter().map(|t| t.intent.as_str()).collect();
        assert!(
            intents.len() >= 5,
            "50 tickets should cover most intents: {intents:?}"
        );
    }

    #[test]
    fn scoring_checks_each_field() {
        let t = &generate_tickets(1, 9)[0];
        assert!(score_output(t, &t.target_json()).exact);
        assert!(score_output(t, &format!("```json\n{}\n```", t.target_json())).exact);
        let wrong = t.target_json().replace(&t.order_id, "ORD-00000X");
        let p = score_output(t, &wrong);
        assert!(p.valid_json && !p.exact && p.fields[0] && !p.fields[1] && p.fields[2]);
        let p = score_output(t, "The intent is refund.");
        assert!(!p.valid_json && !p.exact && p.fields == [false; 3]);
    }
}
