//! Reading a dataset into rows of JSON values: JSON Lines (our own line-by-line parser, so a
//! malformed line is reported by its number), CSV and Parquet through polars, and polars
//! DataFrames handed in by the caller.

use std::fmt;
use std::fs::File;
use std::path::Path;

use polars::prelude::{
    CsvReadOptions, DataFrame, JsonFormat, JsonWriter, ParquetReader, SerReader, SerWriter,
};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Where a row came from, for messages: JSONL rows by their 1-based line in the file, CSV,
/// Parquet and DataFrame rows by their 1-based data row (CSV's header not counted), JSON-array
/// and programmatic records by their 1-based position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLocation {
    /// Line of a JSON Lines file.
    Line(usize),
    /// Data row of a CSV file (the header is not counted).
    CsvRow(usize),
    /// Row of a Parquet file or DataFrame.
    Row(usize),
    /// Element of a JSON array or of a list of records.
    Record(usize),
}

impl fmt::Display for RowLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowLocation::Line(n) => write!(f, "line {n}"),
            RowLocation::CsvRow(n) => write!(f, "row {n} (CSV data row, header not counted)"),
            RowLocation::Row(n) => write!(f, "row {n}"),
            RowLocation::Record(n) => write!(f, "record {n}"),
        }
    }
}

/// The kind of source, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceKind {
    JsonLines,
    JsonArray,
    Csv,
    Parquet,
    DataFrame,
    Records,
}

impl SourceKind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            SourceKind::JsonLines => "JSON Lines",
            SourceKind::JsonArray => "JSON array",
            SourceKind::Csv => "CSV",
            SourceKind::Parquet => "Parquet",
            SourceKind::DataFrame => "DataFrame",
            SourceKind::Records => "records",
        }
    }
}

/// Rows read from a source, before they are interpreted.
#[derive(Debug)]
pub(crate) struct Table {
    pub name: String,
    pub kind: SourceKind,
    /// Column names in order of first appearance.
    pub columns: Vec<String>,
    pub rows: Vec<(RowLocation, Map<String, Value>)>,
    /// Rows that could not even be parsed (only when invalid rows are skipped).
    pub unreadable: Vec<String>,
}

impl Table {
    fn new(name: String, kind: SourceKind) -> Self {
        Self {
            name,
            kind,
            columns: Vec::new(),
            rows: Vec::new(),
            unreadable: Vec::new(),
        }
    }

    /// Adds a row; `text` (its JSON) gives new columns in the order the row writes them
    /// (serde_json's map is sorted).
    fn push(&mut self, loc: RowLocation, row: Map<String, Value>, text: &str) {
        if row.keys().any(|k| !self.columns.contains(k)) {
            let order = serde_json::from_str::<KeyOrder>(text)
                .map(|k| k.0)
                .unwrap_or_else(|_| row.keys().cloned().collect());
            for key in order {
                if !self.columns.contains(&key) {
                    self.columns.push(key);
                }
            }
        }
        self.rows.push((loc, row));
    }
}

/// Reads a file by its extension: `.jsonl`/`.ndjson`/`.json` (JSON Lines, or one JSON array of
/// objects when the file starts with `[`), `.csv`, `.parquet`.
pub(crate) fn read_file(path: &Path, skip_invalid: bool) -> Result<Table> {
    let name = path.display().to_string();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if !path.is_file() {
        return Err(Error::data(
            name,
            "file not found (give the path of a .jsonl, .json, .csv or .parquet file)",
        ));
    }
    match ext.as_str() {
        "jsonl" | "ndjson" | "json" => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            read_json(&name, &bytes, skip_invalid)
        }
        "csv" => read_csv(path, &name),
        "parquet" => {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            let frame = ParquetReader::new(file).finish().map_err(|e| {
                Error::data(&name, format!("polars cannot read this Parquet file: {e}"))
            })?;
            frame_table(&frame, name, SourceKind::Parquet)
        }
        _ => Err(Error::data(
            name,
            format!(
                "unknown file type `.{ext}`: datasets are read from .jsonl (or .json), .csv or \
                 .parquet files; convert the file or load it into a polars DataFrame and use \
                 SftDataset::from_frame"
            ),
        )),
    }
}

/// JSON Lines (one object per line; blank lines ignored) or a JSON array of objects.
pub(crate) fn read_json(name: &str, bytes: &[u8], skip_invalid: bool) -> Result<Table> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        return read_json_array(name, bytes);
    }
    let mut table = Table::new(name.to_string(), SourceKind::JsonLines);
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let loc = RowLocation::Line(i + 1);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let problem = match std::str::from_utf8(line) {
            Err(e) => format!(
                "{loc}: not valid UTF-8 (byte {} of the line); save the file as UTF-8",
                e.valid_up_to() + 1
            ),
            Ok(text) => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(map)) => {
                    table.push(loc, map, text);
                    continue;
                }
                Ok(other) => format!(
                    "{loc}: expected a JSON object ({{\"column\": value, ...}}), found {}",
                    json_kind(&other)
                ),
                Err(e) => format!(
                    "{loc}: invalid JSON at column {}: {}; every line must hold one complete \
                     JSON object",
                    e.column(),
                    strip_position(&e)
                ),
            },
        };
        if skip_invalid {
            table.unreadable.push(problem);
        } else {
            return Err(Error::data(
                name,
                format!(
                    "{problem} (or pass DataConfig::skip_invalid_rows(true) to skip such lines)"
                ),
            ));
        }
    }
    Ok(table)
}

fn read_json_array(name: &str, bytes: &[u8]) -> Result<Table> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        Error::data(
            name,
            format!(
                "invalid JSON at line {} column {}: {} (a .json dataset is either JSON Lines or \
                 one array of objects)",
                e.line(),
                e.column(),
                strip_position(&e)
            ),
        )
    })?;
    let Value::Array(items) = value else {
        unreachable!("the file starts with `[`")
    };
    let mut table = Table::new(name.to_string(), SourceKind::JsonArray);
    for (i, item) in items.into_iter().enumerate() {
        let loc = RowLocation::Record(i + 1);
        match item {
            Value::Object(map) => {
                for key in map.keys() {
                    if !table.columns.contains(key) {
                        table.columns.push(key.clone());
                    }
                }
                table.rows.push((loc, map));
            }
            other => {
                return Err(Error::data(
                    name,
                    format!(
                        "{loc} of the array: expected a JSON object, found {}",
                        json_kind(&other)
                    ),
                ))
            }
        }
    }
    Ok(table)
}

fn read_csv(path: &Path, name: &str) -> Result<Table> {
    // Every column as a string: ids or numeric answers stay as written.
    let frame = CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|r| r.finish())
        .map_err(|e| Error::data(name, format!("polars cannot read this CSV file: {e}")))?;
    frame_table(&frame, name.to_string(), SourceKind::Csv)
}

/// A DataFrame's rows as JSON objects (through polars' own NDJSON writer, so nested lists and
/// structs — chat messages in Parquet — arrive as JSON arrays and objects).
pub(crate) fn frame_table(frame: &DataFrame, name: String, kind: SourceKind) -> Result<Table> {
    let mut buf = Vec::new();
    let mut frame = frame.clone();
    // polars' NDJSON writer drops rows of a frame whose columns are split into several chunks
    // (after a filter or vstack); one chunk per column writes them all.
    frame.rechunk_mut();
    JsonWriter::new(&mut buf)
        .with_json_format(JsonFormat::JsonLines)
        .finish(&mut frame)
        .map_err(|e| Error::data(&name, format!("cannot convert the DataFrame's rows: {e}")))?;
    let mut table = Table::new(name, kind);
    table.columns = frame
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .collect();
    for (i, line) in buf
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let loc = match kind {
            SourceKind::Csv => RowLocation::CsvRow(i + 1),
            _ => RowLocation::Row(i + 1),
        };
        match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(map)) => table.rows.push((loc, map)),
            other => {
                return Err(Error::data(
                    &table.name,
                    format!("{loc}: polars wrote an unexpected row: {other:?}"),
                ))
            }
        }
    }
    if table.rows.len() != frame.height() {
        return Err(Error::data(
            &table.name,
            format!(
                "the DataFrame has {} rows but {} were converted",
                frame.height(),
                table.rows.len()
            ),
        ));
    }
    Ok(table)
}

/// The keys of a JSON object in the order written.
struct KeyOrder(Vec<String>);

impl<'de> serde::Deserialize<'de> for KeyOrder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = KeyOrder;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<KeyOrder, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(KeyOrder(keys))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// `a string`, `an array`, ... for messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde_json's message without its " at line L column C" suffix (we say where ourselves).
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_are_numbered_and_blank_lines_skipped() {
        let text = b"{\"a\": 1}\n\n{\"b\": \"x\"}\r\n{\"a\": 2,}\n[1]\n";
        let err = read_json("d.jsonl", text, false).unwrap_err().to_string();
        assert!(err.contains("d.jsonl") && err.contains("line 4"), "{err}");
        assert!(err.contains("column 9"), "{err}");
        let t = read_json("d.jsonl", text, true).unwrap();
        assert_eq!(t.columns, vec!["a", "b"]);
        let locs: Vec<_> = t.rows.iter().map(|r| r.0).collect();
        assert_eq!(locs, vec![RowLocation::Line(1), RowLocation::Line(3)]);
        assert_eq!(t.unreadable.len(), 2);
        assert!(t.unreadable[1].contains("line 5") && t.unreadable[1].contains("an array"));
        let t = read_json(
            "d.jsonl",
            b"{\"z\": 1, \"a\": 2}\n{\"m\": 3, \"a\": 4}",
            false,
        )
        .unwrap();
        assert_eq!(
            t.columns,
            vec!["z", "a", "m"],
            "columns in the order written"
        );
    }

    #[test]
    fn json_array_and_bom() {
        let t = read_json(
            "d.json",
            b"\xEF\xBB\xBF [{\"text\": \"a\"}, {\"text\": \"b\"}]",
            false,
        )
        .unwrap();
        assert_eq!(t.kind, SourceKind::JsonArray);
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[1].0, RowLocation::Record(2));
    }
}
