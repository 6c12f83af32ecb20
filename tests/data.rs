//! SFT datasets on the default model: token ids and completion masks equal to TRL's (reference
//! data from tests/reference/data_reference.py), every file format, the error messages users
//! see for bad data, the lenient mode, splitting, collation and epoch order.
//!
//! Missing reference data or model is a failure that says what to run, never a silent pass.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use polars::prelude::*;
use qlora::candle_core::Device;
use qlora::data::{
    collate, epoch_batches, ColumnMap, DataConfig, Format, Record, SftDataset, TokenizedExample,
};
use qlora::model::{Message, Model};
use qlora::train::IGNORE_INDEX;
use serde_json::Value as Json;

/// The default model, loaded once for all tests.
fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = common::default_gguf();
        Model::load(path.to_str().expect("utf-8 path"))
            .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
    })
}

fn data_reference_dir() -> PathBuf {
    let dir = common::reference_dir().join("data");
    assert!(
        dir.join("index.json").is_file(),
        "data reference missing in {}: run `make reference`",
        dir.display()
    );
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn ids(v: &Json) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// The text of the tokens an example is trained on.
fn trained_text(e: &TokenizedExample) -> String {
    let ids: Vec<u32> = e
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    model().tokenizer.decode(&ids, false).unwrap()
}

fn err_of(r: qlora::Result<SftDataset>) -> String {
    match r {
        Ok(d) => panic!("expected an error, got a dataset: {}", d.report),
        Err(e) => e.to_string(),
    }
}

#[test]
fn ids_and_masks_match_trl_reference() {
    let dir = data_reference_dir();
    let index: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let m = model();
    assert_eq!(
        Some(index["eos_token_id"].as_u64().unwrap() as u32),
        m.tokenizer.eos_token_id()
    );
    let datasets = index["datasets"].as_object().unwrap();
    assert!(datasets.len() >= 6, "{:?}", datasets.keys());
    for (name, d) in datasets {
        let config = DataConfig::default()
            .max_seq_len(4096)
            .use_chat_template(d["use_chat_template"].as_bool().unwrap());
        let data = SftDataset::load(dir.join(d["file"].as_str().unwrap()), m, &config)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let rows = d["rows"].as_array().unwrap();
        assert_eq!(data.train.len(), rows.len(), "{name}");
        assert_eq!(data.report.truncated, 0, "{name}");
        for (i, (ours, theirs)) in data.train.iter().zip(rows).enumerate() {
            let want_ids = ids(&theirs["input_ids"]);
            let got_ids: Vec<u64> = ours.input_ids.iter().map(|&x| x as u64).collect();
            assert_eq!(got_ids, want_ids, "{name} row {i}: input ids");
            let want_labels: Vec<i64> = want_ids
                .iter()
                .zip(ids(&theirs["mask"]))
                .map(|(&id, m)| if m == 1 { id as i64 } else { IGNORE_INDEX })
                .collect();
            assert_eq!(ours.labels, want_labels, "{name} row {i}: labels");
            assert_eq!(ours.row, i + 1, "{name}: JSONL rows are numbered by line");
        }
        assert_eq!(data.pad_token_id, 2, "SmolLM2 pads with <|im_end|>");
    }
    // The assistant span ends with the end-of-turn tokens, so the model learns to stop.
    let chat = SftDataset::load(dir.join("chat.jsonl"), m, &DataConfig::default()).unwrap();
    assert_eq!(trained_text(&chat.train[0]), "4<|im_end|>\n");
    assert_eq!(
        trained_text(&chat.train[2]),
        "Bonjour !<|im_end|>\nTrès bien, merci.\nEt vous ?<|im_end|>\n"
    );
    assert_eq!(chat.report.format, Format::Chat);
    assert!(chat.report.chat_template);
    let sharegpt = SftDataset::load(dir.join("sharegpt.jsonl"), m, &DataConfig::default()).unwrap();
    assert!(sharegpt
        .report
        .column_mapping
        .contains(&("messages".into(), "conversations".into())));
}

#[test]
fn default_max_seq_len_truncates_the_long_example() {
    let dir = data_reference_dir();
    let full = SftDataset::load(
        dir.join("chat.jsonl"),
        model(),
        &DataConfig::default().max_seq_len(4096),
    )
    .unwrap();
    let cut = SftDataset::load(dir.join("chat.jsonl"), model(), &DataConfig::default()).unwrap();
    assert_eq!(cut.report.max_seq_len, 512);
    assert_eq!(cut.report.truncated, 1);
    assert_eq!(cut.report.dropped, 0);
    assert_eq!(cut.report.longest, 512);
    let long = full.train.iter().position(|e| e.len() > 512).unwrap();
    assert_eq!(cut.train[long].input_ids, full.train[long].input_ids[..512]);
    assert_eq!(cut.train[long].labels, full.train[long].labels[..512]);
    for (a, b) in cut
        .train
        .iter()
        .zip(&full.train)
        .filter(|(a, _)| a.len() < 512)
    {
        assert_eq!(a, b);
    }
}

#[test]
fn malformed_json_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "bad_rows.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n\
         {\"prompt\": \"c\", \"completion\": \"d\"}\n\
         {\"prompt\": \"e\", \"completion\": \"f\"\n\
         {\"prompt\": \"g\", \"completion\": \"h\"}\n",
    );
    let err = err_of(SftDataset::load(&p, model(), &DataConfig::default()));
    assert!(err.contains("bad_rows.jsonl"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("invalid JSON"), "{err}");
    assert!(err.contains("skip_invalid_rows"), "says what to do: {err}");
}

#[test]
fn missing_column_names_it_and_the_columns_found() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "qa.jsonl",
        "{\"prompt\": \"q\", \"answer\": \"a\"}\n",
    );
    let forced = DataConfig::default().format(Format::PromptCompletion);
    let err = err_of(SftDataset::load(&p, model(), &forced));
    assert!(err.contains("qa.jsonl"), "{err}");
    assert!(err.contains("missing column `completion`"), "{err}");
    assert!(err.contains("`prompt`, `answer`"), "{err}");
    let err = err_of(SftDataset::load(&p, model(), &DataConfig::default()));
    assert!(err.contains("cannot tell the dataset's format"), "{err}");
    assert!(err.contains("ColumnMap::prompt_completion"), "{err}");
    // The mapping fixes it.
    let mapped = DataConfig::default().columns(ColumnMap::new().with("completion", "answer"));
    let data = SftDataset::load(&p, model(), &mapped).unwrap();
    assert_eq!(data.report.format, Format::PromptCompletion);
    assert_eq!(
        data.report.column_mapping,
        vec![("completion".to_string(), "answer".to_string())]
    );
}

#[test]
fn empty_completion_names_row_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "pc.jsonl",
        "{\"prompt\": \"q1\", \"completion\": \"a1\"}\n\n{\"prompt\": \"q2\", \"completion\": \"\"}\n",
    );
    let err = err_of(SftDataset::load(&p, model(), &DataConfig::default()));
    assert!(
        err.contains("pc.jsonl") && err.contains("line 3") && err.contains("`completion` is empty"),
        "{err}"
    );
    let p = write(
        tmp.path(),
        "chat.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"\"}]}\n",
    );
    let err = err_of(SftDataset::load(&p, model(), &DataConfig::default()));
    assert!(
        err.contains("line 1") && err.contains("message 2 (assistant) has empty content"),
        "{err}"
    );
}

#[test]
fn csv_rows_and_missing_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "qa.csv",
        "question,answer,id\n\"What is 2+2?\",4,1\n\"Multi\nline, quoted\",\"yes, it is\",2\nq3,,3\n",
    );
    let config = DataConfig::default().columns(ColumnMap::prompt_completion("question", "answer"));
    let err = err_of(SftDataset::load(&p, model(), &config));
    assert!(err.contains("qa.csv"), "{err}");
    assert!(err.contains("row 3 (CSV data row"), "{err}");
    assert!(err.contains("`answer` is null"), "{err}");

    let lenient = config.clone().skip_invalid_rows(true);
    let data = SftDataset::load(&p, model(), &lenient).unwrap();
    assert_eq!(data.report.source_kind, "CSV");
    assert_eq!(data.report.rows_read, 3);
    assert_eq!(data.report.skipped, 1);
    assert_eq!(data.train.len(), 2);
    assert_eq!(data.train[1].row, 2);
    // Numbers stay as written (every CSV column is read as a string).
    assert_eq!(trained_text(&data.train[0]), "4<|im_end|>\n");
    assert_eq!(trained_text(&data.train[1]), "yes, it is<|im_end|>\n");

    // A row with fewer fields than the header.
    let p = write(tmp.path(), "short.csv", "prompt,completion\nq1,a1\nq2\n");
    match SftDataset::load(&p, model(), &DataConfig::default()) {
        Ok(d) => panic!("a row without its completion was accepted: {}", d.report),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("short.csv"), "{e}");
            assert!(
                e.contains("row 2") && e.contains("`completion` is null"),
                "{e}"
            );
        }
    }
}

#[test]
fn long_rows_are_truncated_or_dropped_and_counted() {
    let long = "word ".repeat(200);
    let records = vec![
        Record::prompt_completion("Short prompt.", long.clone()),
        Record::prompt_completion(long.clone(), "answer"),
        Record::prompt_completion("ok", "fine"),
    ];
    let config = DataConfig::default().max_seq_len(64);
    let data = SftDataset::from_records(records, model(), &config).unwrap();
    assert_eq!(data.report.rows_read, 3);
    assert_eq!(data.report.truncated, 2);
    assert_eq!(data.report.dropped, 1);
    assert_eq!(data.train.len(), 2);
    assert_eq!(data.train[0].len(), 64);
    assert_eq!(data.train[0].labels.len(), 64);
    assert_eq!(data.train[1].row, 3);
    let w = data
        .report
        .warnings
        .iter()
        .find(|w| w.starts_with("dropped"))
        .unwrap();
    assert!(
        w.contains("record 2") && w.contains("max_seq_len 64"),
        "{w}"
    );
    assert!(data.report.to_string().contains("truncated"));
}

#[test]
fn skip_invalid_rows_counts_warnings_and_keeps_good_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "mixed.jsonl",
        "{\"prompt\": \"q1\", \"completion\": \"a1\"}\n\
         {\"prompt\": \"q2\", \"completion\": \n\
         {\"prompt\": \"q3\", \"completion\": \"\"}\n\
         {\"prompt\": null, \"completion\": \"a4\"}\n\
         {\"prompt\": \"q5\"}\n\
         {\"prompt\": \"q6\", \"completion\": \"a6\"}\n",
    );
    let strict = err_of(SftDataset::load(&p, model(), &DataConfig::default()));
    assert!(
        strict.contains("line 2"),
        "fails on the first bad line: {strict}"
    );
    let data =
        SftDataset::load(&p, model(), &DataConfig::default().skip_invalid_rows(true)).unwrap();
    assert_eq!(data.report.rows_read, 6);
    assert_eq!(data.report.skipped, 4);
    assert_eq!(data.report.warnings.len(), 4);
    assert_eq!(data.report.examples, 2);
    let rows: Vec<usize> = data.train.iter().map(|e| e.row).collect();
    assert_eq!(rows, vec![1, 6]);
    for (w, (line, what)) in data.report.warnings.iter().zip([
        (2, "invalid JSON"),
        (3, "`completion` is empty"),
        (4, "`prompt` is null"),
        (5, "`completion` is missing"),
    ]) {
        assert!(
            w.contains(&format!("line {line}")) && w.contains(what),
            "{w}"
        );
    }
    // Nothing usable at all is still an error, with the first reason.
    let p = write(
        tmp.path(),
        "none.jsonl",
        "{\"prompt\": \"q\", \"completion\": \"\"}\n",
    );
    let err = err_of(SftDataset::load(
        &p,
        model(),
        &DataConfig::default().skip_invalid_rows(true),
    ));
    assert!(
        err.contains("no usable examples") && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn parquet_and_dataframes_read_like_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data_reference_dir();
    let m = model();
    for name in ["chat.jsonl", "prompt_completion.jsonl", "alpaca.jsonl"] {
        let jsonl = dir.join(name);
        let want = SftDataset::load(&jsonl, m, &DataConfig::default()).unwrap();
        // polars infers messages as List(Struct{role, content}); write Parquet and read it back.
        let mut frame = JsonReader::new(std::fs::File::open(&jsonl).unwrap())
            .with_json_format(JsonFormat::JsonLines)
            .finish()
            .unwrap();
        let pq = tmp.path().join(name.replace(".jsonl", ".parquet"));
        ParquetWriter::new(std::fs::File::create(&pq).unwrap())
            .finish(&mut frame)
            .unwrap();
        let got = SftDataset::load(&pq, m, &DataConfig::default()).unwrap();
        assert_eq!(got.report.source_kind, "Parquet");
        assert_eq!(got.report.format, want.report.format);
        assert_eq!(got.train, want.train, "{name} via Parquet");
        let from_frame =
            SftDataset::from_frame(&frame, "my frame", m, &DataConfig::default()).unwrap();
        assert_eq!(from_frame.train, want.train, "{name} via DataFrame");
        assert_eq!(from_frame.report.source, "my frame");
    }

    // A frame built in Rust with other column names.
    let frame = df!(
        "question" => ["Translate to German: cat", "Capital of France?"],
        "answer" => ["Katze", "Paris"],
    )
    .unwrap();
    let config = DataConfig::default().columns(ColumnMap::prompt_completion("question", "answer"));
    let data = SftDataset::from_frame(&frame, "df", m, &config).unwrap();
    let want = SftDataset::load(
        dir.join("prompt_completion.jsonl"),
        m,
        &DataConfig::default(),
    )
    .unwrap();
    assert_eq!(data.train[0].input_ids, want.train[0].input_ids);
    assert_eq!(trained_text(&data.train[1]), "Paris<|im_end|>\n");
    // A filtered frame read from a large CSV (several chunks per column) keeps every row.
    let csv = dir.join("big.csv");
    let mut text = String::from("question,answer\n");
    for i in 0..20_000 {
        text.push_str(&format!("q{i},a{i}\n"));
    }
    std::fs::write(&csv, text).unwrap();
    let big = CsvReadOptions::default()
        .with_has_header(true)
        .try_into_reader_with_file_path(Some(csv))
        .unwrap()
        .finish()
        .unwrap();
    let answers = big.column("answer").unwrap().str().unwrap().clone();
    let keep: Vec<bool> = (0..answers.len())
        .map(|i| answers.get(i).is_some_and(|a| a.ends_with('7')))
        .collect();
    let filtered = big
        .filter(&BooleanChunked::from_slice("keep".into(), &keep))
        .unwrap();
    assert_eq!(filtered.height(), 2_000);
    let data = SftDataset::from_frame(&filtered, "big", m, &config).unwrap();
    assert_eq!(data.train.len(), 2_000);
    let err = err_of(SftDataset::from_frame(
        &frame,
        "df",
        m,
        &DataConfig::default(),
    ));
    assert!(
        err.contains("dataset df") && err.contains("`question`, `answer`"),
        "{err}"
    );
}

#[test]
fn sharegpt_and_column_mapping_match_the_plain_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    let openai = write(
        tmp.path(),
        "openai.jsonl",
        "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello.\"}]}\n",
    );
    let sharegpt = write(
        tmp.path(),
        "sharegpt.jsonl",
        "{\"conversations\": [{\"from\": \"system\", \"value\": \"Be brief.\"}, {\"from\": \"human\", \"value\": \"Hi\"}, {\"from\": \"gpt\", \"value\": \"Hello.\"}]}\n",
    );
    let custom = write(
        tmp.path(),
        "custom.jsonl",
        "{\"dialog\": [{\"speaker\": \"system\", \"text\": \"Be brief.\"}, {\"speaker\": \"user\", \"text\": \"Hi\"}, {\"speaker\": \"assistant\", \"text\": \"Hello.\"}]}\n",
    );
    let base = SftDataset::load(&openai, m, &DataConfig::default()).unwrap();
    let sg = SftDataset::load(&sharegpt, m, &DataConfig::default()).unwrap();
    assert_eq!(sg.train, base.train);
    let map = ColumnMap::chat("dialog")
        .with("role", "speaker")
        .with("content", "text");
    let cu = SftDataset::load(&custom, m, &DataConfig::default().columns(map)).unwrap();
    assert_eq!(cu.train, base.train);

    // Alpaca with other names, and a system column / system prompt.
    let alpaca = write(
        tmp.path(),
        "alpaca.jsonl",
        "{\"task\": \"Name three colours.\", \"context\": \"\", \"result\": \"Red, green, blue.\"}\n",
    );
    let cfg = DataConfig::default()
        .columns(ColumnMap::alpaca("task", "context", "result"))
        .system_prompt("Be brief.");
    let a = SftDataset::load(&alpaca, m, &cfg).unwrap();
    let want = SftDataset::from_records(
        vec![Record::chat(vec![
            Message::system("Be brief."),
            Message::user("Name three colours."),
            Message::assistant("Red, green, blue."),
        ])],
        m,
        &DataConfig::default(),
    )
    .unwrap();
    assert_eq!(a.train[0].input_ids, want.train[0].input_ids);
    assert_eq!(a.train[0].labels, want.train[0].labels);
    let text = m.tokenizer.decode(&a.train[0].input_ids, false).unwrap();
    assert!(
        text.starts_with("<|im_start|>system\nBe brief.<|im_end|>"),
        "{text}"
    );
}

#[test]
fn records_without_chat_template_and_plain_text() {
    let m = model();
    let plain = DataConfig::default().use_chat_template(false);
    let d = SftDataset::from_records(
        vec![
            Record::prompt_completion("Q: 2+2?\nA:", " 4"),
            Record::alpaca("Say hi.", "", "Hi!"),
            Record::text("Just text."),
        ],
        m,
        &plain,
    )
    .unwrap();
    assert_eq!(d.report.format, Format::Auto, "mixed records");
    assert!(!d.report.chat_template);
    let eos = m.tokenizer.eos_token_id().unwrap();
    for e in &d.train {
        assert_eq!(*e.input_ids.last().unwrap(), eos);
        assert_eq!(*e.labels.last().unwrap(), eos as i64);
    }
    assert_eq!(trained_text(&d.train[0]), " 4<|im_end|>");
    let alpaca = m.tokenizer.decode(&d.train[1].input_ids, false).unwrap();
    assert!(
        alpaca.contains("### Instruction:\nSay hi.\n\n### Response:\nHi!"),
        "{alpaca}"
    );
    assert_eq!(trained_text(&d.train[1]), "Hi!<|im_end|>");
    assert!(d.train[2].labels.iter().all(|&l| l != IGNORE_INDEX));
    assert_eq!(trained_text(&d.train[2]), "Just text.<|im_end|>");

    // Conversations need a template.
    let err = err_of(SftDataset::from_records(
        vec![Record::chat(vec![
            Message::user("q"),
            Message::assistant("a"),
        ])],
        m,
        &plain,
    ));
    assert!(
        err.contains("record 1") && err.contains("chat template"),
        "{err}"
    );
}

#[test]
fn leading_whitespace_in_a_completion_trains_on_the_tokens_after_the_prompt() {
    // "assistant\n" + "  two spaces": the tokenizer merges the template's newline with the
    // first space, so that token starts in the prompt and is not trained on.
    let d = SftDataset::from_records(
        vec![Record::prompt_completion("Hi", "  two spaces")],
        model(),
        &DataConfig::default(),
    )
    .unwrap();
    let trained = trained_text(&d.train[0]);
    assert!(
        "  two spaces<|im_end|>\n".ends_with(&trained),
        "{trained:?}"
    );
    assert!(trained.ends_with("two spaces<|im_end|>\n"), "{trained:?}");
}

#[test]
fn a_template_that_is_not_prefix_stable_is_reported() {
    let mut m = model().clone();
    m.tokenizer
        .set_chat_template(
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
             [{{ messages | length }} messages]",
        )
        .unwrap();
    let err = err_of(SftDataset::from_records(
        vec![Record::prompt_completion("q", "a")],
        &m,
        &DataConfig::default(),
    ));
    assert!(
        err.contains("record 1") && err.contains("not prefix-stable"),
        "{err}"
    );
}

#[test]
fn validation_split_is_deterministic() {
    let records = |n: usize| -> Vec<Record> {
        (0..n)
            .map(|i| Record::prompt_completion(format!("q{i}"), format!("a{i}")))
            .collect()
    };
    let rows = |v: &[TokenizedExample]| v.iter().map(|e| e.row).collect::<Vec<_>>();
    let cfg = DataConfig::default().validation_split(0.2);
    let a = SftDataset::from_records(records(30), model(), &cfg).unwrap();
    let b = SftDataset::from_records(records(30), model(), &cfg).unwrap();
    let c = SftDataset::from_records(records(30), model(), &cfg.clone().seed(7)).unwrap();
    assert_eq!((a.train.len(), a.validation.len()), (24, 6));
    assert_eq!(
        (a.report.train_examples, a.report.validation_examples),
        (24, 6)
    );
    assert_eq!(rows(&a.validation), rows(&b.validation));
    assert_eq!(rows(&a.train), rows(&b.train));
    assert_ne!(rows(&a.validation), rows(&c.validation));
    let all: BTreeSet<usize> = rows(&a.train)
        .into_iter()
        .chain(rows(&a.validation))
        .collect();
    assert_eq!(all, (1..=30).collect());
    let err = err_of(SftDataset::from_records(
        records(1),
        model(),
        &DataConfig::default().validation_split(0.5),
    ));
    assert!(err.contains("leaves none for training"), "{err}");
}

#[test]
fn collate_pads_and_epoch_batches_cover_every_example() {
    let dir = data_reference_dir();
    let data = SftDataset::load(dir.join("chat.jsonl"), model(), &DataConfig::default()).unwrap();
    let refs: Vec<&TokenizedExample> = data.train.iter().take(3).collect();
    let batch = collate(&refs, data.pad_token_id, &Device::Cpu).unwrap();
    let t = refs.iter().map(|e| e.len()).max().unwrap();
    assert_eq!(batch.input_ids.dims(), &[3, t]);
    assert_eq!(batch.labels.dims(), &[3, t]);
    assert_eq!(batch.attention_mask.dims(), &[3, t]);
    assert_eq!(batch.labels.dtype(), qlora::candle_core::DType::I64);
    let ids = batch.input_ids.to_vec2::<u32>().unwrap();
    let labels = batch.labels.to_vec2::<i64>().unwrap();
    let mask = batch.attention_mask.to_vec2::<u32>().unwrap();
    for (i, e) in refs.iter().enumerate() {
        assert_eq!(ids[i][..e.len()], e.input_ids[..]);
        assert_eq!(labels[i][..e.len()], e.labels[..]);
        assert!(ids[i][e.len()..].iter().all(|&x| x == data.pad_token_id));
        assert!(labels[i][e.len()..].iter().all(|&x| x == IGNORE_INDEX));
        assert_eq!(mask[i].iter().sum::<u32>() as usize, e.len());
    }
    assert_eq!(
        batch.num_tokens,
        refs.iter().map(|e| e.len()).sum::<usize>()
    );
    assert_eq!(
        batch.num_target_tokens,
        labels
            .iter()
            .map(|r| r[1..].iter().filter(|&&l| l != IGNORE_INDEX).count())
            .sum::<usize>()
    );

    // Epoch order: a permutation, per (seed, epoch).
    let lengths: Vec<usize> = (0..203).map(|i| (i * 37) % 101 + 1).collect();
    for group in [false, true] {
        let e0 = epoch_batches(&lengths, 8, 42, 0, true, group);
        assert_eq!(e0.len(), 26, "last partial batch kept");
        assert!(e0[..25].iter().all(|b| b.len() == 8) && e0[25].len() == 3);
        let mut seen: Vec<usize> = e0.concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..203).collect::<Vec<_>>());
        assert_eq!(e0, epoch_batches(&lengths, 8, 42, 0, true, group));
        assert_ne!(e0, epoch_batches(&lengths, 8, 42, 1, true, group));
        assert_ne!(e0, epoch_batches(&lengths, 8, 43, 0, true, group));
    }
    assert_eq!(
        epoch_batches(&lengths, 8, 42, 0, false, false).concat(),
        (0..203).collect::<Vec<_>>()
    );
    // Grouped batches waste far less padding than random ones, and the longest comes first.
    let waste = |batches: &[Vec<usize>]| -> usize {
        batches
            .iter()
            .map(|b| {
                let max = b.iter().map(|&i| lengths[i]).max().unwrap();
                b.iter().map(|&i| max - lengths[i]).sum::<usize>()
            })
            .sum()
    };
    let grouped = epoch_batches(&lengths, 8, 42, 0, true, true);
    let random = epoch_batches(&lengths, 8, 42, 0, true, false);
    assert!(
        waste(&grouped) * 3 < waste(&random),
        "grouped {} vs random {}",
        waste(&grouped),
        waste(&random)
    );
    assert_eq!(lengths[grouped[0][0]], *lengths.iter().max().unwrap());
    assert!(epoch_batches(&[], 4, 1, 0, true, true).is_empty());
}
